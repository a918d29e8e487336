//! The HTTP endpoint: `GET /metrics` (Prometheus text format), `GET /healthz`
//! (liveness), `GET /readyz` (readiness). Plain HTTP/1.1 on the configured address,
//! loopback unless configured otherwise.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use super::STATE;
use crate::config::MetricsConfig;

#[derive(Clone)]
struct Ctx {
    handle: super::Handle,
    ready_within: Duration,
    stuck_after: Duration,
}

/// Binds `cfg.listen` (an error names the address) and serves until `stop`.
pub async fn serve(
    cfg: &MetricsConfig,
    listen: SocketAddr,
    handle: super::Handle,
    stop: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("metrics.listen: cannot listen on {listen}: {e} (another process holds the port? choose another in [metrics] listen)"),
        )
    })?;
    let ctx = Ctx {
        handle,
        ready_within: cfg.ready_within,
        stuck_after: cfg.stuck_after,
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(ctx);
    tracing::info!(address = %listener.local_addr()?, "metrics and health endpoint listening (/metrics, /healthz, /readyz)");
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    }))
}

async fn metrics(axum::extract::State(ctx): axum::extract::State<Ctx>) -> impl IntoResponse {
    STATE.refresh(ctx.ready_within);
    ctx.handle.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        ctx.handle.render(),
    )
}

async fn healthz(axum::extract::State(ctx): axum::extract::State<Ctx>) -> impl IntoResponse {
    match STATE.health(ctx.stuck_after) {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn readyz(axum::extract::State(ctx): axum::extract::State<Ctx>) -> impl IntoResponse {
    match STATE.readiness(ctx.ready_within) {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

/// `walshore health`: asks a running walshore's `/healthz` at `addr` (a wildcard
/// address is asked on loopback). Ok(body) on 200, Err(why) otherwise.
pub async fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(target).await.map_err(|e| {
            format!("cannot connect to {target}: {e} (is walshore run with [metrics] listen = \"{addr}\"?)")
        })?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("{target}: {e}"))?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await.map_err(|e| format!("{target}: {e}"))?;
        Ok::<_, String>(String::from_utf8_lossy(&reply).into_owned())
    };
    let reply = tokio::time::timeout(timeout, ask)
        .await
        .map_err(|_| format!("{target} did not answer within {timeout:?}"))??;
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("{target} did not answer HTTP"))?;
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim().to_owned();
    if status == 200 {
        Ok(body)
    } else {
        Err(format!("{path}: {status} {body}"))
    }
}
