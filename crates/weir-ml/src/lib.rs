//! Weir's ML layer, on top of the derivations:
//! - feature jobs (`tables/features/`, history tables with `valid_from`/`valid_to`) run by
//!   [`build_features`], and point-in-time retrieval over them ([`pit`]);
//! - the Lance vector table of listings with its IVF_PQ index and the price rating
//!   ([`vectors`]), and nearest-neighbour search ([`search`]).

pub mod embed;
pub mod pit;
pub mod search;
pub mod sql;
pub mod vectors;

use weir_derive::{DeriveOptions, JobReport, Jobs};
use weir_lake::Lake;

/// The feature jobs, in the order they are built.
pub const FEATURE_JOBS: [&str; 2] = ["listing_features", "segment_price"];

#[derive(Debug, thiserror::Error)]
pub enum MlError {
    #[error(transparent)]
    Derive(#[from] weir_derive::DeriveError),
    #[error("{context}: {source}")]
    DataFusion { context: String, source: Box<datafusion::error::DataFusionError> },
    #[error("{context}: {message}")]
    Lance { context: String, message: String },
    #[error("arrow: {0}")]
    Arrow(String),
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Request(String),
}

pub(crate) fn df(context: impl Into<String>) -> impl FnOnce(datafusion::error::DataFusionError) -> MlError {
    let context = context.into();
    move |source| MlError::DataFusion { context, source: Box::new(source) }
}

/// Runs the feature jobs (and the entities they read, when their inputs changed) at
/// `opts.as_of_micros`. `jobs` must hold the entity jobs and the feature jobs.
pub async fn build_features(
    lake: &Lake,
    jobs: &Jobs,
    bronze: &[String],
    opts: &DeriveOptions,
    mut on_start: impl FnMut(&str),
) -> Result<Vec<JobReport>, MlError> {
    // A history only moves forward: refuse an earlier as-of before anything runs.
    let mut session = weir_derive::LakeSession::open(lake, &[]).await?;
    for name in FEATURE_JOBS {
        let Some(job) = jobs.get(name) else {
            return Err(MlError::Config(format!("the feature job {name} is not among the jobs")));
        };
        let out = job.output(None);
        if session.register_delta(lake, &out).await?.is_none() {
            continue;
        }
        weir_derive::history::check_forward(&session.ctx, &out, &out, opts.as_of_micros).await?;
    }
    let mut reports: Vec<JobReport> = Vec::new();
    for name in FEATURE_JOBS {
        let one = DeriveOptions { job: Some(name.to_string()), ..opts.clone() };
        for r in weir_derive::derive(lake, jobs, bronze, &one, &mut on_start).await? {
            if !reports.iter().any(|seen| seen.output == r.output) {
                reports.push(r);
            }
        }
    }
    Ok(reports)
}
