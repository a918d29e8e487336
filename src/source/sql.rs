//! Ordinary SQL (catalog queries) over tokio-postgres, with the same TLS policy as the
//! replication connection.

use super::tls;
use crate::config::{ConnParams, SslMode};

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error(
        "cannot connect to PostgreSQL at {target}: {source}; check source.url and that the server is running and reachable"
    )]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// Connects and drives the connection on a task.
pub async fn connect(p: &ConnParams) -> Result<tokio_postgres::Client, SqlError> {
    let mut c = tokio_postgres::Config::new();
    c.host(&p.host)
        .port(p.port)
        .user(&p.user)
        .dbname(&p.dbname)
        .application_name(&p.application_name)
        .connect_timeout(p.connect_timeout)
        // A copy connection whose peer vanished (a cut or blackholed link) is noticed
        // by TCP keepalives instead of hanging.
        .keepalives(true)
        .keepalives_idle(std::time::Duration::from_secs(30))
        .keepalives_interval(std::time::Duration::from_secs(10))
        .keepalives_retries(3)
        .ssl_mode(match p.sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
    if let Some(pw) = &p.password {
        c.password(pw);
    }
    let target = format!("{}:{}", p.host, p.port);
    let err = |source| SqlError::Connect {
        target: target.clone(),
        source,
    };
    let client = match tls::client_config(p).map_err(SqlError::Tls)? {
        None => {
            let (client, conn) = c.connect(tokio_postgres::NoTls).await.map_err(err)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        }
        Some(cfg) => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*cfg).clone());
            let (client, conn) = c.connect(tls).await.map_err(err)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        }
    };
    Ok(client)
}
