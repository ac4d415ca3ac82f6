//! Weir's derivations: the jobs declared in `tables/jobs/` run as DataFusion plans over the
//! lake's bronze Delta tables and land silver (entities) and gold (marts) Delta tables,
//! incrementally; PostgreSQL-exact numerics; and `weir parity` against the legacy mart.

pub mod aggregates;
pub mod functions;
pub mod history;
pub mod incremental;
pub mod jobs;
mod keyed;
pub mod parity;
pub mod run;
pub mod session;
pub mod split;

pub use jobs::{Job, JobError, Jobs, Layer, Materialize, load_dir};
pub use parity::{ParityOptions, ParityReport, parity};
pub use run::{DeriveOptions, JobOutcome, JobReport, MakeSelection, derive};
pub use session::LakeSession;

#[derive(Debug, thiserror::Error)]
pub enum DeriveError {
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Delta(#[from] Box<weir_lake::DeltaError>),
    #[error(transparent)]
    Postgres(#[from] weir_postgres::PgError),
    #[error("{context}: {source}")]
    DataFusion { context: String, source: Box<datafusion::error::DataFusionError> },
    #[error("{table}: {message}")]
    Write { table: String, message: String },
    #[error("unknown job {0:?} (jobs: {1})")]
    UnknownJob(String, String),
    #[error("unknown make {0:?}: bronze.makes has no such slug (slugs: {1})")]
    UnknownMake(String, String),
    #[error("bronze.{0} is not in the lake yet: run `weir backfill` first")]
    MissingBronze(String),
    #[error("{0}")]
    Parity(String),
}

impl From<weir_lake::DeltaError> for DeriveError {
    fn from(e: weir_lake::DeltaError) -> Self {
        DeriveError::Delta(Box::new(e))
    }
}

pub(crate) fn df_err(context: impl Into<String>) -> impl FnOnce(datafusion::error::DataFusionError) -> DeriveError {
    let context = context.into();
    move |source| DeriveError::DataFusion { context, source: Box::new(source) }
}
