//! The replication connection: TLS modes against a real server with a certificate made
//! by the test, and WAL safety on an idle publication.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;
use walshore::cluster::TempCluster;

fn openssl(dir: &std::path::Path, args: &[&str]) {
    run_ok(
        Command::new("openssl").args(args).current_dir(dir),
        &format!("openssl {args:?} (apt-get install openssl)"),
    );
}

/// A CA, and a server certificate for 127.0.0.1 signed by it; plus an unrelated CA.
fn make_certs(dir: &std::path::Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=walshore test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=other CA",
            "-keyout",
            "other.key",
            "-out",
            "other.crt",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(dir.join("ext.cnf"), "subjectAltName = IP:127.0.0.1, DNS:localhost\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.crt",
        ],
    );
}

/// Turns TLS on in `cluster` with a certificate for 127.0.0.1 from a CA made here; the
/// returned folder holds `ca.crt` and an unrelated `other.crt`.
async fn serve_tls(cluster: &TempCluster) -> tempfile::TempDir {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let data = cluster.data_dir().to_owned();
    for f in ["server.crt", "server.key"] {
        std::fs::copy(certs.path().join(f), data.join(f)).unwrap();
    }
    if unsafe { libc::geteuid() } == 0 {
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(data.join("server.crt"))
            .arg(data.join("server.key"))
            .status()
            .unwrap();
    }
    std::fs::set_permissions(
        data.join("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let admin = cluster.connect("postgres").await.unwrap();
    admin.batch_execute("ALTER SYSTEM SET ssl = on").await.unwrap();
    admin.query_one("SELECT pg_reload_conf()", &[]).await.unwrap();
    wait_until(Duration::from_secs(10), "ssl to be on", || async {
        admin.query_one("SHOW ssl", &[]).await.unwrap().get::<_, String>(0) == "on"
    })
    .await;
    certs
}

#[tokio::test]
async fn tls_modes_verify_the_server_as_libpq_does() {
    let cluster = cluster(&[]);
    let certs = serve_tls(&cluster).await;
    let admin = cluster.connect("postgres").await.unwrap();
    admin
        .batch_execute("CREATE TABLE a (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE a")
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let sink = SinkKind::File(dir.path().join("lake"));
    let url = |params: &str| format!("postgres://postgres@127.0.0.1:{}/postgres?{params}", cluster.port);
    let ca = certs.path().join("ca.crt");
    let other = certs.path().join("other.crt");

    // verify-full with the right CA: works, and the replication connection is encrypted.
    let config = write_config(
        dir.path(),
        &url(&format!("sslmode=verify-full&sslrootcert={}", ca.display())),
        "pub",
        "walshore",
        &sink,
        "",
        "",
    );
    sync(&config);
    // Some MiB of stream through TLS, read in gulps beneath it by the reader thread,
    // arrive whole.
    admin
        .batch_execute("INSERT INTO a SELECT generate_series(1, 100000)")
        .await
        .unwrap();
    sync(&config);
    let lake = read_table(&open_lake(&config), "public", "a").await;
    assert_eq!(lake.rows.len(), 100_000, "rows streamed through TLS");
    let child = spawn_run(&config);
    wait_until(Duration::from_secs(30), "an encrypted walsender", || async {
        let r = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) WHERE s.ssl",
                &[],
            )
            .await
            .unwrap();
        r.get::<_, i64>(0) == 1
    })
    .await;
    let (status, stderr) = support::stop(child);
    assert!(status.success(), "{stderr}");

    for mode in [
        "sslmode=require",
        &format!("sslmode=verify-ca&sslrootcert={}", ca.display()),
    ] {
        let config = write_config(dir.path(), &url(mode), "pub", "walshore", &sink, "", "");
        sync(&config);
    }

    // The wrong CA is refused, by verify-ca and by require-with-a-root (as libpq).
    for mode in ["verify-full", "verify-ca", "require"] {
        let config = write_config(
            dir.path(),
            &url(&format!("sslmode={mode}&sslrootcert={}", other.display())),
            "pub",
            "walshore",
            &sink,
            "",
            "",
        );
        let out = walshore(&["sync", "--config", config.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{mode}: {stderr}");
        assert!(
            stderr.contains("TLS to PostgreSQL at 127.0.0.1") && stderr.contains("certificate"),
            "{mode}: {stderr}"
        );
    }
}

#[tokio::test]
async fn idle_publication_on_a_busy_database_does_not_hold_wal() {
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute("CREATE TABLE published (id int PRIMARY KEY); CREATE TABLE busy (id int); CREATE PUBLICATION pub FOR TABLE published").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &cluster.url("postgres", "postgres"),
        "pub",
        "walshore",
        &SinkKind::File(dir.path().join("lake")),
        "",
        "status_interval = \"1s\"",
    );
    let child = spawn_run(&config);
    wait_until(Duration::from_secs(30), "the slot to be active", || async {
        slot_count(&c, true).await == 1
    })
    .await;
    // 32 MiB of WAL that the publication does not care about.
    for _ in 0..8 {
        c.batch_execute("INSERT INTO busy SELECT generate_series(1, 100000)")
            .await
            .unwrap();
    }
    let written: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    wait_until(
        Duration::from_secs(60),
        "the slot to confirm past the unpublished writes",
        || async {
            c.query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots",
                &[&written],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
        },
    )
    .await;
    let (status, stderr) = support::stop(child);
    assert!(status.success(), "{stderr}");
    assert!(
        !dir.path().join("lake/public").exists(),
        "no data file for a publication that saw no change"
    );
}

/// MD5 works; a password asked for in clear text goes only to a server whose
/// certificate was verified, or where the user allows it, on the replication connection
/// and the ordinary sessions alike.
#[tokio::test]
async fn md5_works_and_a_cleartext_password_goes_only_to_a_verified_server_or_by_choice() {
    let cluster = cluster(&[]);
    let certs = serve_tls(&cluster).await;
    let hba = cluster.data_dir().join("pg_hba.conf");
    let rest = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "host all md5user 127.0.0.1/32 md5\nhost replication md5user 127.0.0.1/32 md5\n\
             host all pwuser 127.0.0.1/32 password\nhost replication pwuser 127.0.0.1/32 password\n{rest}"
        ),
    )
    .unwrap();
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute(
        "SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN REPLICATION PASSWORD 'pw-md5';
         CREATE ROLE pwuser LOGIN REPLICATION PASSWORD 'pw-clear';
         CREATE TABLE a (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE a;
         GRANT SELECT ON a TO md5user, pwuser",
    )
    .await
    .unwrap();
    c.query_one("SELECT pg_reload_conf()", &[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = |user: &str, password: &str, params: &str| {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/postgres?{params}",
            cluster.port
        )
    };
    let config = |url: &str, slot: &str, extra_source: &str| {
        write_config(
            dir.path(),
            url,
            "pub",
            slot,
            &SinkKind::File(dir.path().join(slot)),
            "",
            extra_source,
        )
    };
    let verified = format!(
        "sslmode=verify-full&sslrootcert={}",
        certs.path().join("ca.crt").display()
    );
    for (user, password, slot, params, extra) in [
        ("md5user", "pw-md5", "slot_md5", "sslmode=disable", ""),
        ("pwuser", "pw-clear", "slot_verified", verified.as_str(), ""),
        (
            "pwuser",
            "pw-clear",
            "slot_allowed",
            "sslmode=disable",
            "allow_cleartext_password = true",
        ),
    ] {
        sync(&config(&url(user, password, params), slot, extra));
        // A wrong password: refused by the server, which says why.
        let out = walshore(&[
            "sync",
            "--config",
            config(&url(user, "nope", params), slot, extra).to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{user}: {stderr}");
        assert!(
            stderr.contains(&format!("refused user \"{user}\"")) && stderr.contains("password authentication failed"),
            "{user}: {stderr}"
        );
    }
    // Unverified, unencrypted or encrypted alike, and not allowed: the right password is
    // not sent, by the replication connection (sync) or an ordinary session (status).
    for params in ["sslmode=disable", "sslmode=prefer", "sslmode=require"] {
        let refused = config(&url("pwuser", "pw-clear", params), "slot_refused", "");
        for command in ["sync", "status"] {
            let out = walshore(&[command, "--config", refused.to_str().unwrap()]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{params} {command}: {stderr}");
            assert!(
                stderr.contains("asked for the password in clear text") && stderr.contains("allow_cleartext_password"),
                "{params} {command}: {stderr}"
            );
            assert!(
                !stderr.contains("transient failure"),
                "{params} {command}: not retried:\n{stderr}"
            );
        }
    }
}

/// A PAM service that hands each login's password to `tests/py/iam_token_check.py`,
/// which checks it as RDS checks an IAM token. Removed on drop.
struct IamChecker {
    service: String,
    dir: tempfile::TempDir,
}

impl IamChecker {
    /// Accepts tokens for `host` signed with the credentials of `set_fake_aws_env`.
    fn install(host: &str) -> IamChecker {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "this test installs a PAM service in /etc/pam.d and must run as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("iam_token_check.py");
        std::fs::copy(
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/iam_token_check.py"),
            &script,
        )
        .unwrap();
        let log = dir.path().join("checks.jsonl");
        std::fs::write(&log, "").unwrap();
        // The server runs as postgres: it must reach the script and append to the log.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).unwrap();
        let service = format!("walshore-iam-test-{}", std::process::id());
        std::fs::write(
            format!("/etc/pam.d/{service}"),
            format!(
                "auth required pam_exec.so expose_authtok quiet /usr/bin/python3 {} \
                 --access-key testing --secret-key testing --region us-east-1 --host {host} --log {}\n\
                 account required pam_permit.so\n",
                script.display(),
                log.display()
            ),
        )
        .unwrap();
        IamChecker { service, dir }
    }

    /// One entry per login attempt: (accepted, why, X-Amz-Date, signature).
    fn checks(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("checks.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for IamChecker {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(format!("/etc/pam.d/{}", self.service));
    }
}

/// `source.auth = "iam"`: every connection logs in with a token signed for it, so the
/// replication connection outlives its token and a reconnect after the token's lifetime
/// (5 s here, 15 min on RDS) still logs in. The server checks each token as RDS does.
#[tokio::test]
async fn iam_tokens_are_signed_per_connection_and_reconnects_outlive_their_lifetime() {
    set_fake_aws_env();
    let cluster = cluster(&[]);
    let certs = serve_tls(&cluster).await;
    let host = format!("127.0.0.1:{}", cluster.port);
    let checker = IamChecker::install(&host);
    let hba = cluster.data_dir().join("pg_hba.conf");
    let rest = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "hostssl all iamuser 127.0.0.1/32 pam pamservice={0}\n\
             hostssl replication iamuser 127.0.0.1/32 pam pamservice={0}\n\
             host all iamuser 127.0.0.1/32 reject\n{rest}",
            checker.service
        ),
    )
    .unwrap();
    let admin = cluster.connect("postgres").await.unwrap();
    admin
        .batch_execute(
            "CREATE ROLE iamuser LOGIN SUPERUSER;
             CREATE TABLE a (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE a",
        )
        .await
        .unwrap();
    admin.query_one("SELECT pg_reload_conf()", &[]).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "postgres://iamuser@{host}/postgres?sslmode=verify-full&sslrootcert={}",
        certs.path().join("ca.crt").display()
    );
    let iam = "auth = \"iam\"\nregion = \"us-east-1\"\niam_token_lifetime = \"5s\"";
    let lake = SinkKind::File(dir.path().join("lake"));
    let config = write_config(dir.path(), &url, "pub", "walshore", &lake, "", iam);
    sync(&config);
    let child = spawn_run(&config);
    let _log = LogOnPanic::new(&child);
    let store = open_lake(&config);
    let lake_rows = |n: usize| {
        let store = store.clone();
        async move { read_table(&store, "public", "a").await.rows.len() == n }
    };
    admin
        .batch_execute("INSERT INTO a SELECT generate_series(1, 10)")
        .await
        .unwrap();
    wait_until(Duration::from_secs(60), "the first rows in the lake", || lake_rows(10)).await;
    let walsender = || async {
        admin
            .query_opt("SELECT pid FROM pg_stat_replication WHERE usename = 'iamuser'", &[])
            .await
            .unwrap()
            .map(|r| r.get::<_, i32>(0))
    };
    let first = walsender().await.expect("a walsender for iamuser");

    // Past every token's lifetime, the logged-in replication connection goes on.
    tokio::time::sleep(Duration::from_secs(6)).await;
    admin
        .batch_execute("INSERT INTO a SELECT generate_series(11, 20)")
        .await
        .unwrap();
    wait_until(Duration::from_secs(60), "rows after the token expired", || {
        lake_rows(20)
    })
    .await;
    assert_eq!(
        walsender().await,
        Some(first),
        "the replication connection was not replaced"
    );

    // A reconnect signs a new token: every token so far has expired, and the checker
    // refuses an expired one.
    let before = checker.checks().len();
    admin
        .query_one("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .unwrap();
    admin
        .batch_execute("INSERT INTO a SELECT generate_series(21, 30)")
        .await
        .unwrap();
    wait_until(Duration::from_secs(60), "rows after the reconnect", || lake_rows(30)).await;
    let second = walsender().await.expect("a new walsender");
    assert_ne!(second, first);
    let (status, stderr) = support::stop(child);
    assert!(status.success(), "{stderr}");

    let checks = checker.checks();
    let refused: Vec<_> = checks.iter().filter(|c| c["ok"] != true).collect();
    assert!(refused.is_empty(), "refused logins: {refused:?}");
    assert!(
        checks.len() > before,
        "the reconnect logged in through the checker: {checks:?}"
    );
    // Wrong credentials: the token does not verify, and the error says what to check.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walshore"))
        .args(["sync", "--config", config.to_str().unwrap()])
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("refused user \"iamuser\"") && stderr.contains("rds-db:connect"),
        "{stderr}"
    );
    assert_eq!(checker.checks().last().unwrap()["why"], "signature does not match");
}

/// The stream is read in gulps under a backlog (far fewer reads than messages: a reader
/// woken per message costs the walsender as much as its decoding), and a lone change
/// after the backlog, and another after a pause, still arrive at once: the gulp's wait
/// is bounded, and an idle stream waits for its next byte.
#[tokio::test]
async fn a_backlog_is_read_in_gulps_and_a_lone_change_after_it_arrives_at_once() {
    use walshore::source::{Replication, XLog};
    let cluster = cluster(&[]);
    let c = cluster.connect("postgres").await.unwrap();
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR TABLE t")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = lake_config(dir.path(), &cluster, "postgres");
    let cfg = walshore::config::Config::load(&config).unwrap();
    let (mut repl, slot, _) = Replication::open(&cfg.source, false).await.unwrap();
    // About 6 MB of stream: 60,000 inserts in 60 transactions.
    c.batch_execute(
        "DO $$ BEGIN FOR b IN 0..59 LOOP
           INSERT INTO t SELECT i, repeat('x', 40) FROM generate_series(b * 1000 + 1, b * 1000 + 1000) AS i;
           COMMIT; END LOOP; END $$",
    )
    .await
    .unwrap();
    repl.start(&cfg.source, slot.confirmed_flush).await.unwrap();
    // Counts commits ('C' messages) until `want`; the time the last one took to come.
    async fn commits(repl: &mut Replication, want: u64, messages: &mut u64) {
        let mut seen = 0;
        while seen < want {
            match tokio::time::timeout(Duration::from_secs(60), repl.next()).await {
                Ok(Ok(XLog::Data { data, .. })) => {
                    *messages += 1;
                    if data.first() == Some(&b'C') {
                        seen += 1;
                    }
                }
                Ok(Ok(XLog::Keepalive { .. })) => {}
                Ok(Err(e)) => panic!("stream failed: {e}"),
                Err(_) => panic!("no message for 60 s with {seen} of {want} commits seen"),
            }
        }
    }
    let mut messages = 0;
    commits(&mut repl, 60, &mut messages).await;
    let wire = repl.wire_stats();
    assert!(messages > 60_000, "{messages} messages for the backlog");
    // Read as they come: a read per few messages here. (The unit tests in
    // src/source/conn.rs show the gulps' sizes and bounds on a socket of their own.)
    assert!(
        wire.reads * 20 < messages,
        "the backlog's {messages} messages took {} reads ({} bytes each): not read in gulps",
        wire.reads,
        wire.bytes / wire.reads.max(1)
    );
    // A lone change right after the backlog, then one after the stream went idle: each
    // arrives at once (a gulp waits 20 ms at most; without that bound, less than a gulp
    // would wait for more data, here for ever).
    for pause in [Duration::ZERO, Duration::from_secs(2)] {
        tokio::time::sleep(pause).await;
        c.batch_execute("INSERT INTO t VALUES (1000000, 'lone') ON CONFLICT (id) DO UPDATE SET v = 'again'")
            .await
            .unwrap();
        let t = std::time::Instant::now();
        let mut lone = 0;
        commits(&mut repl, 1, &mut lone).await;
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "a lone change after a {pause:?} pause took {:?} to arrive",
            t.elapsed()
        );
    }
    repl.close().await;
}
