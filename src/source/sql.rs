//! Ordinary SQL (catalog queries) over tokio-postgres, with the same TLS policy as the
//! replication connection.

use super::tls;
use crate::config::{ConnParams, SslMode};

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// Refused by the server, or the session failed while it was set up.
    #[error(
        "cannot connect to PostgreSQL at {target}: {source}; check source.url and that the server is running and reachable"
    )]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "cannot connect to PostgreSQL at {target}: {source}; check source.url and that the server is running and reachable"
    )]
    Tcp {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot connect to PostgreSQL at {target}: no answer within connect_timeout ({after:?}); check source.url and that the server is running and reachable"
    )]
    Timeout { target: String, after: std::time::Duration },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("{0}")]
    IamToken(String),
}

/// Connects and drives the connection on a task. The password goes to a server that
/// asks for it in clear text only as `tls::cleartext_allowed` says (see `guard`).
pub async fn connect(p: &ConnParams) -> Result<tokio_postgres::Client, SqlError> {
    let mut c = tokio_postgres::Config::new();
    c.host(&p.host)
        .port(p.port)
        .user(&p.user)
        .dbname(&p.dbname)
        .application_name(&p.application_name)
        .ssl_mode(match p.sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
    // Signed now, for this connection alone: an IAM token is good for one login.
    if let Some(pw) = super::iam::password(p).await.map_err(SqlError::IamToken)? {
        c.password(pw);
    }
    let target = format!("{}:{}", p.host, p.port);
    let err = |source| SqlError::Connect {
        target: target.clone(),
        source,
    };
    let tls = tls::client_config(p).map_err(SqlError::Tls)?;
    let refusal = tls::cleartext_allowed(p).err();
    // libpq's connect_timeout: the whole set-up, TCP to authentication.
    let set_up = async {
        let tcp = super::conn::tcp_connect(&target)
            .await
            .map_err(|source| SqlError::Tcp {
                target: target.clone(),
                source,
            })?;
        // The SSL request's one-byte answer precedes the messages.
        let skip = usize::from(tls.is_some());
        let stream = super::guard::AuthGuard::new(tcp, skip, refusal.clone());
        let client = match &tls {
            None => {
                let (client, conn) = c.connect_raw(stream, tokio_postgres::NoTls).await.map_err(err)?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                client
            }
            Some(cfg) => {
                use tokio_postgres::tls::MakeTlsConnect;
                let mut make = tokio_postgres_rustls::MakeRustlsConnect::new((**cfg).clone());
                let connector = MakeTlsConnect::<super::guard::AuthGuard<tokio::net::TcpStream>>::make_tls_connect(
                    &mut make, &p.host,
                )
                .map_err(|e| SqlError::Tls(e.to_string()))?;
                let guarded = super::guard::GuardedTls {
                    tls: connector,
                    refusal: refusal.clone(),
                };
                let (client, conn) = c.connect_raw(stream, guarded).await.map_err(err)?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                client
            }
        };
        Ok::<_, SqlError>(client)
    };
    match tokio::time::timeout(p.connect_timeout, set_up).await {
        Ok(r) => r,
        Err(_) => Err(SqlError::Timeout {
            target: target.clone(),
            after: p.connect_timeout,
        }),
    }
}

/// A transaction with a transaction id: one that a new replication slot's snapshot
/// point waits for (PostgreSQL takes the point once every transaction running when it
/// was asked for has ended).
#[derive(Clone, Debug, serde::Serialize)]
pub struct OpenTransaction {
    pub pid: i32,
    /// `pg_stat_activity.state`: `idle in transaction` for one nobody is using.
    pub state: String,
    pub age_seconds: f64,
    pub user: String,
    pub application: String,
}

impl std::fmt::Display for OpenTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} ({}, open {:.0} s, user {:?}, application {:?})",
            self.pid, self.state, self.age_seconds, self.user, self.application
        )
    }
}

/// The oldest open transactions with a transaction id (at most five), oldest first.
/// Sessions of other users show only with `pg_read_all_stats` (or as superuser).
pub async fn open_transactions(client: &tokio_postgres::Client) -> Result<Vec<OpenTransaction>, String> {
    let rows = client
        .query(
            "SELECT pid, coalesce(state, ''), extract(epoch FROM now() - xact_start)::float8,
                    coalesce(usename::text, ''), coalesce(application_name, '')
             FROM pg_catalog.pg_stat_activity
             WHERE backend_xid IS NOT NULL AND pid <> pg_catalog.pg_backend_pid() AND xact_start IS NOT NULL
             ORDER BY xact_start LIMIT 5",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows
        .iter()
        .map(|r| OpenTransaction {
            pid: r.get(0),
            state: r.get(1),
            age_seconds: r.get(2),
            user: r.get(3),
            application: r.get(4),
        })
        .collect())
}
