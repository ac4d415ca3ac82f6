//! Weir's ingest engine: `weir backfill` lands PostgreSQL tables as Delta tables from one
//! exported snapshot, with N parallel COPY BINARY workers decoding straight into Arrow,
//! resumably (finished chunks are recorded in the lake) and with one Delta commit per table
//! that records the snapshot's LSN for CDC.

pub mod backfill;
pub mod cdc;
pub mod metrics;
pub mod partition;
pub mod plan;
pub mod sources;
pub mod state;

pub use backfill::{BackfillOptions, Outcome, SlotMode, TableReport, backfill, default_slot_name};
pub use cdc::{
    BatchReport, DEFAULT_DECODING_WORK_MEM, SyncOptions, SyncReport, TableChanges, set_decoding_work_mem, sync,
};
pub use metrics::{Metrics, TableCounters};
pub use sources::{SourceTable, Sources};

use weir_lake::{DeltaError, LakeStoreError};
use weir_postgres::{DecodeError, PgError, TypeError};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Type(#[from] TypeError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Delta(Box<DeltaError>),
    #[error(transparent)]
    Lake(#[from] LakeStoreError),
    #[error("malformed sources file {path}: {message}")]
    Sources { path: String, message: String },
    #[error("unknown table {table:?} (tables/sources.toml lists: {known})")]
    UnknownTable { table: String, known: String },
    #[error("table {table} does not exist in the source database")]
    MissingTable { table: String },
    #[error("{message}")]
    Config { message: String },
    #[error("backfill state: {message}")]
    State { message: String },
    #[error(
        "table {table} is being backfilled into {lake} by another weir process right now; try again when it has finished"
    )]
    Busy { table: String, lake: String },
    #[error(
        "the source has wal_level={level}; CDC needs wal_level=logical (or pass --no-slot to backfill without a replication slot)"
    )]
    WalLevel { level: String },
    #[error("table {table}, chunk {chunk}: writing Parquet: {message}")]
    Write { table: String, chunk: u32, message: String },
    #[error("table {table}: chunks {missing:?} have no manifest after the run; nothing was committed")]
    Incomplete { table: String, missing: Vec<u32> },
    #[error("{message}")]
    Cdc { message: String },
    #[error(
        "table {table}: DDL that CDC cannot follow: {detail}; land the table again with `weir backfill --tables {table} --force`"
    )]
    Ddl { table: String, detail: String },
    #[error("background task failed: {0}")]
    Task(String),
}

impl From<DeltaError> for IngestError {
    fn from(e: DeltaError) -> Self {
        Self::Delta(Box::new(e))
    }
}

/// Parquet settings for every bronze file: zstd level 1 (bronze is written in bulk, on the
/// backfill's hot path: at SF 10 level 3 made price_log's backfill ~4 % slower for files
/// 5 % smaller), page statistics, row groups for scans, and
/// dictionaries only where values repeat by nature (text, integers, booleans, dates): for
/// timestamps, decimals and floats, mostly distinct, a dictionary is built per page only to
/// be abandoned, which was the largest single cost of a backfill (price_log at SF 10).
/// Integer key columns (`key` in sources.toml) are mostly distinct too, and arrive in key
/// order within a chunk: they get delta encoding instead of a dictionary (price_log at
/// SF 10: the backfill ~8 % faster, the files 15 % smaller).
pub fn parquet_properties(
    schema: &arrow_schema::Schema,
    key: &[String],
) -> deltalake::parquet::file::properties::WriterProperties {
    use arrow_schema::DataType;
    use deltalake::parquet::basic::{Compression, Encoding, ZstdLevel};
    use deltalake::parquet::file::properties::{EnabledStatistics, WriterProperties};
    use deltalake::parquet::schema::types::ColumnPath;
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("valid level")))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(1 << 20));
    for f in schema.fields() {
        let path = || ColumnPath::from(f.name().as_str());
        let integer = matches!(f.data_type(), DataType::Int16 | DataType::Int32 | DataType::Int64);
        if integer && key.contains(f.name()) {
            b = b
                .set_column_dictionary_enabled(path(), false)
                .set_column_encoding(path(), Encoding::DELTA_BINARY_PACKED);
        }
        if matches!(
            f.data_type(),
            DataType::Timestamp(_, _) | DataType::Decimal128(_, _) | DataType::Float32 | DataType::Float64
        ) {
            b = b.set_column_dictionary_enabled(path(), false);
        }
    }
    b.build()
}
