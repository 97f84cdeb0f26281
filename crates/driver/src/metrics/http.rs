//! The metrics endpoint: `GET /metrics` over HTTP/1.1 (hyper on the process's tokio
//! runtime), the text format's own `Content-Type`; 404 for any other path. The address
//! is bound before any work starts, so one that cannot be had fails the command at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::{Metrics, Serving};

/// The metrics address cannot be served.
#[derive(Debug, Error)]
#[error(
    "cannot serve metrics on {addr}: {reason}\n\nhint: choose another address with --metrics, \
     or `metrics` (the agent) or `[build] metrics` in offload's config"
)]
pub struct MetricsError {
    pub addr: SocketAddr,
    /// Said in the message, before the hint.
    pub reason: std::io::Error,
}

/// This process's metrics, and the server that answers scrapes of them when an address
/// was given.
pub struct Exposed {
    metrics: Arc<Metrics>,
    server: Option<MetricsServer>,
}

impl Exposed {
    /// The metrics `serving` has, served at `addr` if one is given (bound now).
    pub async fn bind(addr: Option<SocketAddr>, serving: Serving) -> Result<Exposed, MetricsError> {
        let server = match addr {
            Some(addr) => Some(MetricsServer::bind(addr).await?),
            None => None,
        };
        Ok(Exposed {
            metrics: Arc::new(Metrics::new(serving)),
            server,
        })
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The address bound, if any.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(MetricsServer::addr)
    }

    /// Runs `work` while the server (if any) answers scrapes; it stops with `work`.
    pub async fn around<T>(self, work: impl std::future::Future<Output = T>) -> T {
        let Some(server) = self.server else {
            return work.await;
        };
        tokio::pin!(work);
        tokio::select! {
            done = &mut work => done,
            // Never told to stop: `work` ends first, and dropping the server closes it.
            () = server.serve(self.metrics, std::future::pending()) => work.await,
        }
    }
}

/// A bound, not yet serving, metrics address.
pub struct MetricsServer {
    listener: TcpListener,
    addr: SocketAddr,
}

impl MetricsServer {
    /// Binds `addr` (port 0: any free port; [`MetricsServer::addr`] says which).
    pub async fn bind(addr: SocketAddr) -> Result<MetricsServer, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|reason| MetricsError { addr, reason })?;
        let addr = listener
            .local_addr()
            .map_err(|reason| MetricsError { addr, reason })?;
        Ok(MetricsServer { listener, addr })
    }

    /// The address bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers scrapes of `metrics` until `stop` completes; connections still open
    /// then are dropped. Cancel-safe: dropping it closes the listener.
    pub async fn serve(self, metrics: Arc<Metrics>, stop: impl std::future::Future<Output = ()>) {
        let mut connections = JoinSet::new();
        tokio::pin!(stop);
        loop {
            let stream = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!("metrics on {}: accepting a connection: {e}", self.addr);
                        continue;
                    }
                },
                // Finished connections are reaped as they end.
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                () = &mut stop => break,
            };
            let metrics = metrics.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(answer(&metrics, &request)) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(e) = served {
                    tracing::debug!("a metrics scrape ended early: {e}");
                }
            });
        }
        connections.abort_all();
    }
}

/// The answer to one request.
fn answer(metrics: &Metrics, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "not found: offload's metrics are at /metrics\n".into(),
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "/metrics takes GET\n".into(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let mut response = reply(StatusCode::OK, metrics.encode());
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(prometheus_client::encoding::prometheus_text::CONTENT_TYPE),
    );
    response
}
