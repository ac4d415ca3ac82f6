//! Real local services for tests, benchmarks and the demo: an ephemeral PostgreSQL 15
//! cluster (initdb + pg_ctl from the system packages) and the in-repo S3 server.

mod pg;

pub use pg::{PgCluster, PgOptions, find_pg_bindir};
pub use weir_s3server::{DEFAULT_ACCESS_KEY, DEFAULT_REGION, DEFAULT_SECRET_KEY, S3Server, S3ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error("PostgreSQL 15 server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/15/bin or PATH{hint}")]
    NoPostgres { hint: String },
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    S3(#[from] weir_s3server::S3ServerError),
}
