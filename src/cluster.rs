//! A throwaway PostgreSQL cluster from the machine's own server binaries: `initdb` into
//! a temporary directory, `wal_level = logical`, a free loopback port. Used by
//! `walshore demo`, the integration tests and the benchmark. PostgreSQL refuses to run
//! as root, so when we are root the server runs as the `postgres` user.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "PostgreSQL server binaries not found (looked for initdb and pg_ctl in $WALSHORE_PG_BIN and /usr/lib/postgresql/*/bin); install them with `apt-get install postgresql` (Debian/Ubuntu)"
    )]
    NoBinaries,
    #[error(
        "running as root, but the `postgres` user that PostgreSQL must run as does not exist; install the Debian package `postgresql`, which creates it"
    )]
    NoPostgresUser,
    #[error("{step} failed: {detail}")]
    Step { step: String, detail: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Options for [`TempCluster::start`].
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Extra `postgresql.conf` lines.
    pub settings: Vec<String>,
    /// Where the cluster lives; a fresh temporary directory when `None`.
    pub dir: Option<PathBuf>,
    /// Extra environment of the server tools and so of the server (e.g. `LD_PRELOAD`).
    pub env: Vec<(String, String)>,
}

pub struct TempCluster {
    _tmp: Option<tempfile::TempDir>,
    data: PathBuf,
    bin: PathBuf,
    pub port: u16,
    as_postgres: bool,
    env: Vec<(String, String)>,
    running: bool,
}

/// The newest `/usr/lib/postgresql/<v>/bin` (or `$WALSHORE_PG_BIN`).
pub fn find_binaries() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("WALSHORE_PG_BIN") {
        let p = PathBuf::from(dir);
        return p.join("initdb").exists().then_some(p);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

/// libfaketime, to preload into a throwaway server whose clock a test or a bench
/// moves (the Debian package `libfaketime`: `/usr/lib/<arch>/faketime/`).
pub fn libfaketime() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists())
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl TempCluster {
    pub fn start(opts: ClusterOptions) -> Result<TempCluster, ClusterError> {
        let bin = find_binaries().ok_or(ClusterError::NoBinaries)?;
        let as_postgres = unsafe { libc::geteuid() } == 0;
        let (tmp, root) = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (None, d.clone())
            }
            None => {
                let t = tempfile::Builder::new().prefix("walshore-pg-").tempdir()?;
                let p = t.path().to_owned();
                (Some(t), p)
            }
        };
        let data = root.join("data");
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&root)
                .status()?;
            if !status.success() {
                return Err(ClusterError::NoPostgresUser);
            }
        }
        let mut c = TempCluster {
            _tmp: tmp,
            data: data.clone(),
            bin,
            port: free_port()?,
            as_postgres,
            env: opts.env.clone(),
            running: false,
        };
        c.run(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        let mut conf = format!(
            "\n# walshore test cluster\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\nwal_level = logical\nmax_replication_slots = 20\nmax_wal_senders = 20\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\nshared_buffers = 128MB\nmax_wal_size = 4GB\nwal_sender_timeout = 60s\n",
            c.port,
            path_str(&data)
        );
        for s in &opts.settings {
            conf.push_str(s);
            conf.push('\n');
        }
        append(&data.join("postgresql.conf"), &conf)?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost replication postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\nhost replication all 127.0.0.1/32 scram-sha-256\n",
        )?;
        if as_postgres {
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&root)
                .status()?;
        }
        // The port was free when picked, but another process (a client's ephemeral
        // port, say) can take it before the server binds it: pick another and retry.
        let mut tries = 0;
        loop {
            match c.pg_ctl_start() {
                Err(ClusterError::Step { detail, .. }) if detail.contains("Address already in use") && tries < 5 => {
                    tries += 1;
                    c.port = free_port()?;
                    append(&data.join("postgresql.conf"), &format!("port = {}\n", c.port))?;
                }
                other => break other?,
            }
        }
        Ok(c)
    }

    fn pg_ctl_start(&mut self) -> Result<(), ClusterError> {
        self.pg_ctl(&["start"])?;
        self.running = true;
        Ok(())
    }

    /// `pg_ctl -D data -l log -w -t 60 <action...>`.
    fn pg_ctl(&self, action: &[&str]) -> Result<(), ClusterError> {
        let log = self.data.join("server.log");
        let mut args = vec!["-D", path_str(&self.data), "-l", path_str(&log), "-w", "-t", "60"];
        args.extend_from_slice(action);
        self.run("pg_ctl", &args)
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), ClusterError> {
        let exe = self.bin.join(tool);
        // `env` after `runuser`, so that the variables reach the server and not only
        // runuser (which resets some of its environment).
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "env"]);
            c
        } else {
            Command::new("env")
        };
        cmd.args(self.env.iter().map(|(k, v)| format!("{k}={v}"))).arg(&exe);
        let out = cmd.args(args).current_dir("/").output()?;
        if !out.status.success() {
            let mut detail = String::from_utf8_lossy(&out.stderr).into_owned();
            if let Ok(log) = std::fs::read_to_string(self.data.join("server.log")) {
                detail.push_str("\nserver log:\n");
                detail.push_str(&log[log.len().saturating_sub(2000)..]);
            }
            return Err(ClusterError::Step {
                step: format!("{tool} {}", args.join(" ")),
                detail,
            });
        }
        Ok(())
    }

    /// `postgres://{user}@127.0.0.1:{port}/{db}?sslmode=disable`
    pub fn url(&self, user: &str, db: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{db}?sslmode=disable", self.port)
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Connects with tokio-postgres as the superuser; the connection runs on a task.
    pub async fn connect(&self, db: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={} user=postgres dbname={db}", self.port),
            tokio_postgres::NoTls,
        )
        .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// `pg_ctl restart` with the given mode (`fast`, `immediate`).
    pub fn restart(&mut self, mode: &str) -> Result<(), ClusterError> {
        self.pg_ctl(&["-m", mode, "restart"])
    }

    /// Starts a cluster [`stop`](Self::stop) stopped.
    pub fn start_again(&mut self) -> Result<(), ClusterError> {
        if !self.running {
            self.pg_ctl_start()?;
        }
        Ok(())
    }

    /// The tail of the server log and the free space beside the data directory.
    pub fn postmortem(&self) -> String {
        let log = std::fs::read_to_string(self.data.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        let free = free_bytes(&self.data)
            .map(|b| format!("{} MiB", b >> 20))
            .unwrap_or_else(|e| format!("unknown ({e})"));
        format!(
            "--- PostgreSQL on port {} (free disk: {free}), server.log tail ---\n{tail}",
            self.port
        )
    }

    pub fn stop(&mut self) -> Result<(), ClusterError> {
        if self.running {
            self.running = false;
            self.pg_ctl(&["-m", "fast", "stop"])?;
        }
        Ok(())
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test shows how the server fared: a crash, a full disk.
            eprintln!("{}", self.postmortem());
        }
        if self.running {
            let _ = self.pg_ctl(&["-m", "immediate", "stop"]);
        }
    }
}

/// Bytes an unprivileged writer may still use on the file system holding `path`.
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

fn append(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)?
        .write_all(text.as_bytes())
}
