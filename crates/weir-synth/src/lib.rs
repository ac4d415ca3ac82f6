//! The synthetic marketplace (`weir generate`, `weir generate day`) and the legacy mart
//! pipeline (`weir legacy build`), Weir's reference for parity.

pub mod catalog;
pub mod day;
pub mod generate;
pub mod hard;
pub mod legacy;
pub mod model;
pub mod rng;
pub mod schema;

pub use day::{DayOptions, DayReport, apply_day};
pub use generate::{GenerateOptions, GenerateReport, generate};
pub use legacy::{LegacyReport, build_legacy_mart, list_make_slugs};
pub use model::{HISTORY_END, HISTORY_START};

use weir_postgres::PgError;

/// Errors of the generator and the legacy pipeline.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("invalid scale {0}: use a number greater than 0 and at most 1000")]
    Scale(f64),
    #[error("invalid taxonomy rate {0}: use a probability between 0 and 1")]
    TaxonomyRate(f64),
    #[error("the database already holds a marketplace ({0}); pass --replace to drop and regenerate it")]
    AlreadyExists(String),
    #[error("the database holds no marketplace: table {0} is missing (run `weir generate` first)")]
    NoMarketplace(String),
    #[error("unknown make slug {slug:?}; known slugs: {known}")]
    UnknownMake { slug: String, known: String },
    #[error(transparent)]
    Slug(#[from] weir_core::IdentError),
    #[error("day {day} was already applied: it is the latest day in the data")]
    DayApplied { day: String },
    #[error("day {day} is not after the latest day in the data ({latest}); days are applied in order")]
    DayNotAfter { day: String, latest: String },
    #[error(
        "legacy build of {table} failed: price_drop_pct of listing {listing_id} is {value}, which does not fit numeric(6,2)"
    )]
    DropPctOverflow { table: String, listing_id: i64, value: String },
    #[error("background task failed: {0}")]
    Task(String),
}

/// Progress of long steps, reported by table. The binary draws bars; tests ignore it.
pub trait Progress: Send + Sync {
    fn start(&self, _table: &str, _expected_rows: u64) {}
    fn advance(&self, _table: &str, _rows: u64) {}
    fn finish(&self, _table: &str, _rows: u64) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {}
