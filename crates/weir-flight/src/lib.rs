//! `weir serve`: an Arrow Flight SQL server over the lake. Every Delta table under
//! bronze/silver/gold and every view job is queryable with DataFusion (and Weir's
//! PostgreSQL-exact functions); gold marts also by their bare names (`ads_vw`).

pub mod catalog;
pub mod ml;
pub mod service;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use catalog::Catalog;
pub use service::{Auth, WeirFlightSql};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Lake(String),
    #[error(transparent)]
    DataFusion(#[from] datafusion::error::DataFusionError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("the Flight server stopped: {0}")]
    Transport(String),
    #[error("serve settings: {0}")]
    Config(String),
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub addr: String,
    pub memory_limit_bytes: usize,
    /// How old the table list may get before a query re-reads it.
    pub refresh: Duration,
    /// (certificate PEM, key PEM)
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
}

/// Binds the address and serves until `shutdown` resolves. Returns the bound address
/// through `on_bound` (port 0 picks a free one).
pub async fn serve(
    catalog: Catalog,
    auth: Auth,
    opts: &ServeOptions,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(&opts.addr)
        .await
        .map_err(|source| ServeError::Bind { addr: opts.addr.clone(), source })?;
    let bound = listener.local_addr().map_err(|source| ServeError::Bind { addr: opts.addr.clone(), source })?;
    let service = WeirFlightSql::new(Arc::new(catalog), auth);
    let svc = arrow_flight::flight_service_server::FlightServiceServer::new(service)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let mut builder = tonic::transport::Server::builder();
    if let Some((cert, key)) = &opts.tls {
        // rustls is built with two crypto providers in this dependency set (ring and
        // aws-lc-rs, from different crates), so it cannot pick one by itself: choose ring
        // for the process unless something already chose.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let identity = tonic::transport::Identity::from_pem(cert, key);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    on_bound(bound);
    let incoming = tokio_stream_listener(listener);
    builder
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| ServeError::Transport(e.to_string()))
}

/// The listener as a stream of connections, for tonic.
fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((next, l))
    })
}
