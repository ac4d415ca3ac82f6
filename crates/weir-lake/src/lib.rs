//! Weir's lake adapter: the object store behind a lake URI (a local folder or an EU S3
//! bucket), the options Delta and Lance need to reach it, and `weir doctor`'s storage checks.

pub mod delta;
pub mod doctor;
pub mod dv;
pub mod dvscan;
pub mod keyed;
pub mod local;
pub mod store;
pub mod vacuum;

pub use delta::{
    DeltaError, KEEP_PREFIX, MergeStats, OP_COLUMN, append_batch, commit_files, commit_metadata, commit_transactions,
    conform, find_commit_info, last_commit_info, maintain, merge_by_key, open_table, retain_stats, settle,
    without_maintenance,
};
pub use doctor::{Check, run_checks};
pub use dv::{KeyScope, MergeLayout, partition_runs, small_files_in_partitions_of};
pub use keyed::rows_with_keys;
pub use local::InlineLocal;
pub use store::{LAYERS, Lake, LakeStoreError};
pub use vacuum::{VacuumReport, delta_tables, vacuum, vacuum_horizon, vacuum_tables};
