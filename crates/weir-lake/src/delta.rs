//! Delta tables in the lake: open, inspect the last commit, commit a set of files at once.

use std::collections::HashMap;

use arrow_schema::Schema as ArrowSchema;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add, MetadataExt as _, StructType, new_metadata};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::{DeltaTable, TableProperty};
use futures::TryStreamExt;
use object_store::ObjectStoreExt as _;
use serde_json::Value;

use crate::store::{Lake, LakeStoreError};

#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error(transparent)]
    Lake(#[from] LakeStoreError),
    #[error("Delta table {table}: {source}")]
    Delta { table: String, source: deltalake::DeltaTableError },
    #[error("Delta table {table}: another writer committed first ({source}); nothing of this run was committed")]
    Conflict { table: String, source: deltalake::DeltaTableError },
}

pub(crate) fn delta_err(table: &str) -> impl FnOnce(deltalake::DeltaTableError) -> DeltaError + '_ {
    move |source| DeltaError::Delta { table: table.to_string(), source }
}

/// A [`DeltaError`] for the table at `rel` with a message of Weir's own.
pub(crate) fn generic(rel: &str, m: impl ToString) -> DeltaError {
    DeltaError::Delta { table: rel.to_string(), source: deltalake::DeltaTableError::Generic(m.to_string()) }
}

/// Commits between checkpoints of the tables Weir creates.
pub const CHECKPOINT_INTERVAL: &str = "10";

/// The table property naming the columns whose statistics the table's files carry.
const STATS_COLUMNS: &str = "delta.dataSkippingStatsColumns";

/// Keeps, in each file's statistics, the entries of `of` (`minValues`, `maxValues`,
/// `nullCount`) for the columns `keep` accepts; the row count and the rest stay.
pub fn retain_stats(adds: &mut [Add], of: &[&str], keep: impl Fn(&str) -> bool) {
    for add in adds {
        let Some(stats) = &add.stats else { continue };
        let Ok(mut v) = serde_json::from_str::<Value>(stats) else { continue };
        for key in of {
            if let Some(obj) = v.get_mut(*key).and_then(Value::as_object_mut) {
                obj.retain(|c, _| keep(c));
            }
        }
        add.stats = Some(v.to_string());
    }
}

/// The tables this process has opened, by URL and storage options, as last seen, with the
/// identity of their latest commit file. Opening one again brings that snapshot up to date with
/// the commits made since (a listing of the log after its version) instead of reading and
/// replaying the whole log: `weir run` and `weir serve` reopen every table on each cycle or
/// refresh, and `weir derive` reopens each table it writes. A commit made through a table
/// opened here replaces it with the table at the new version (its commit file's identity is
/// read when the table is next opened).
type Opened = HashMap<String, (DeltaTable, Option<String>)>;
static OPENED: std::sync::LazyLock<std::sync::Mutex<Opened>> = std::sync::LazyLock::new(Default::default);

fn opened() -> std::sync::MutexGuard<'static, Opened> {
    OPENED.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// After a commit on top of version `base` through a table [`open_table`] handed out (sharing
/// its log store `store`): the cache holds `after`, the table at the new version, instead. The
/// next open takes the commit file found then as this commit's: a table deleted and created
/// again up to the same version in between would go unnoticed, the same window as between
/// opening a table and reading its identity.
fn remember_commit(store: &deltalake::logstore::LogStoreRef, base: Option<u64>, after: &DeltaTable) {
    for (table, identity) in opened().values_mut() {
        if std::sync::Arc::ptr_eq(&table.log_store(), store) && table.version() == base {
            *table = after.clone();
            *identity = None;
        }
    }
}

/// The identity of the table's latest commit file (its ETag, else its time and size): a table
/// deleted and created again under the same URL starts its versions over, with other files.
async fn commit_identity(table: &DeltaTable) -> Option<String> {
    let commit = deltalake::logstore::commit_uri_from_version(Some(table.version()?));
    let meta = table.log_store().object_store(None).head(&commit).await.ok()?;
    Some(meta.e_tag.unwrap_or_else(|| format!("{}-{}", meta.last_modified.timestamp_micros(), meta.size)))
}

/// Opens (or prepares to create) the Delta table at `rel` under the lake: its latest version.
pub async fn open_table(lake: &Lake, rel: &str) -> Result<DeltaTable, DeltaError> {
    let clock = std::time::Instant::now();
    let table = open_table_inner(lake, rel).await?;
    tracing::trace!(table = rel, seconds = clock.elapsed().as_secs_f64(), "opened");
    Ok(table)
}

async fn open_table_inner(lake: &Lake, rel: &str) -> Result<DeltaTable, DeltaError> {
    lake.prepare_table_dir(rel)?;
    let url = lake.table_url(rel);
    let options: std::collections::BTreeMap<_, _> = lake.storage_options().iter().collect();
    let key = format!("{url} {options:?}");
    let cached = opened().get(&key).cloned();
    if let Some((mut table, identity)) = cached {
        let seen = table.version();
        let first = commit_identity(&table).await;
        // Unknown after this process's own commit: its commit file is the one there now.
        let same = first.is_some() && identity.as_ref().is_none_or(|i| Some(i) == first.as_ref());
        if same && table.update_incremental(None).await.is_ok() {
            let now = if table.version() == seen { first } else { commit_identity(&table).await };
            if now.is_some() {
                opened().insert(key, (table.clone(), now));
                return Ok(table);
            }
        }
        opened().remove(&key);
    }
    let table = DeltaTable::try_from_url_with_storage_options(url.clone(), lake.storage_options().clone())
        .await
        .map_err(delta_err(rel))?;
    if let Some(identity) = commit_identity(&table).await {
        opened().insert(key, (table.clone(), Some(identity)));
    }
    Ok(table)
}

/// The application metadata (commitInfo) of the latest commit, if the table exists.
pub async fn last_commit_info(table: &DeltaTable, rel: &str) -> Result<Option<HashMap<String, Value>>, DeltaError> {
    if table.version().is_none() {
        return Ok(None);
    }
    let mut history = table.history(Some(1)).await.map_err(delta_err(rel))?;
    Ok(history.next().map(|ci| ci.info))
}

/// The application metadata of the newest commit whose `key` holds the text `value`, if the
/// table's log still has one (a whole pass over the log: for the rare question whether a
/// run committed long ago, not for every run).
pub async fn find_commit_info(
    table: &DeltaTable,
    rel: &str,
    key: &str,
    value: &str,
) -> Result<Option<HashMap<String, Value>>, DeltaError> {
    if table.version().is_none() {
        return Ok(None);
    }
    let mut history = table.history(None).await.map_err(delta_err(rel))?;
    Ok(history.find(|ci| ci.info.get(key).and_then(Value::as_str) == Some(value)).map(|ci| ci.info))
}

/// Commits `adds` as the table's content in one commit: creates the table (schema and
/// partitioning) when it does not exist, otherwise replaces every current file (overwrite),
/// or with `partition` (`column = value`) only that partition's files. With `stats_columns`
/// the files' statistics are those columns' alone, and the table says so
/// (`delta.dataSkippingStatsColumns`, which later writers, a merge's included, follow): for a
/// table read by key, whose other columns' bounds span every file and only make the log
/// longer to write and to read. Returns the new version and the table at it; `txn` (an
/// application transaction) goes into the same commit. A concurrent writer that commits first
/// makes this fail, never corrupt: the commit file is put-if-absent.
#[allow(clippy::too_many_arguments)]
pub async fn commit_files(
    table: DeltaTable,
    rel: &str,
    schema: &ArrowSchema,
    partition_columns: &[String],
    mut adds: Vec<Add>,
    metadata: HashMap<String, Value>,
    partition: Option<(&str, &str)>,
    txn: Option<deltalake::kernel::Transaction>,
    stats_columns: Option<&[String]>,
) -> Result<(i64, DeltaTable), DeltaError> {
    if let Some(columns) = stats_columns {
        retain_stats(&mut adds, &["minValues", "maxValues", "nullCount"], |c| columns.iter().any(|k| k == c));
    }
    let stats_property = stats_columns.map(|c| c.join(","));
    let mut props = CommitProperties::default().with_metadata(metadata.clone());
    if let Some(t) = &txn {
        props = props.with_application_transaction(t.clone());
    }
    if table.version().is_none() {
        let kernel: StructType = schema.try_into_kernel().map_err(|e| DeltaError::Delta {
            table: rel.to_string(),
            source: deltalake::DeltaTableError::Generic(e.to_string()),
        })?;
        let mut create = table.create();
        if let Some(columns) = &stats_property {
            create = create.with_configuration_property(TableProperty::DataSkippingStatsColumns, Some(columns.clone()));
        }
        let created = create
            .with_columns(kernel.fields().cloned())
            .with_partition_columns(partition_columns.to_vec())
            // Merges write a change data feed: incremental derivations read it.
            .with_configuration_property(TableProperty::EnableChangeDataFeed, Some("true"))
            // A reader replays the JSON commits since the last checkpoint; `weir run` commits
            // to every mart each cycle, so a checkpoint every 100 (the default) made each
            // cycle slower than the one before.
            .with_configuration_property(TableProperty::CheckpointInterval, Some(CHECKPOINT_INTERVAL))
            .with_actions(adds.into_iter().map(Action::Add))
            .with_commit_properties(props)
            .await
            .map_err(|source| classify(rel, source))?;
        return Ok((created.version().unwrap_or(0) as i64, created));
    }
    let filters = match partition {
        Some((c, v)) => vec![deltalake::PartitionFilter::try_from((c, "=", v)).map_err(delta_err(rel))?],
        None => vec![],
    };
    let removes: Vec<Action> = table
        .get_active_add_actions_by_partitions(&filters)
        .map_ok(|f| Action::Remove(f.remove_action(true)))
        .try_collect()
        .await
        .map_err(delta_err(rel))?;
    let mut actions = removes;
    let snapshot = table.snapshot().map_err(delta_err(rel))?;
    // A new schema or partitioning (a job's definition changed): replace the metadata too.
    let kernel: StructType = schema.try_into_kernel().map_err(|e| DeltaError::Delta {
        table: rel.to_string(),
        source: deltalake::DeltaTableError::Generic(e.to_string()),
    })?;
    let mut configuration = snapshot.metadata().configuration().clone();
    let stats_changed = stats_property.as_ref().is_some_and(|c| configuration.get(STATS_COLUMNS) != Some(c));
    if let Some(columns) = &stats_property {
        configuration.insert(STATS_COLUMNS.to_string(), columns.clone());
    }
    if *snapshot.schema() != kernel || snapshot.metadata().partition_columns() != partition_columns {
        let meta = new_metadata(&kernel, partition_columns, configuration).map_err(|e| delta_err(rel)(e.into()))?;
        actions.push(Action::Metadata(meta));
    } else if let (true, Some(columns)) = (stats_changed, stats_property) {
        // A table written before its files' statistics were confined: all its files are
        // replaced here, so from now on every file carries the key columns' alone.
        let meta = snapshot
            .metadata()
            .clone()
            .add_config_key(STATS_COLUMNS.to_string(), columns)
            .map_err(|e| generic(rel, format!("setting {STATS_COLUMNS}: {e}")))?;
        actions.push(Action::Metadata(meta));
    }
    actions.extend(adds.into_iter().map(Action::Add));
    actions.extend(txn.map(Action::Txn));
    let op = DeltaOperation::Write {
        mode: SaveMode::Overwrite,
        partition_by: Some(partition_columns.to_vec()),
        predicate: partition.map(|(c, v)| format!("{c} = {v}")),
    };
    commit(&table, rel, actions, metadata, op).await
}

/// Appends `batch` (the table's columns, partition columns included) as new files in one
/// commit carrying `metadata` and the application transactions `txns`. For rows whose keys the
/// table cannot hold yet (an append-only log's new rows): nothing is compared or rewritten.
pub async fn append_batch(
    table: DeltaTable,
    rel: &str,
    batch: deltalake::arrow::record_batch::RecordBatch,
    writer: deltalake::parquet::file::properties::WriterProperties,
    metadata: HashMap<String, Value>,
    txns: Vec<deltalake::kernel::Transaction>,
) -> Result<i64, DeltaError> {
    use deltalake::writer::{DeltaWriter, RecordBatchWriter};
    let snapshot = table.snapshot().map_err(delta_err(rel))?;
    // The table's own schema (NOT NULL key columns), by column name.
    let batch = conform(&snapshot.snapshot().arrow_schema(), batch, rel)?;
    let clock = std::time::Instant::now();
    let mut w = RecordBatchWriter::for_table(&table).map_err(delta_err(rel))?.with_writer_properties(writer);
    w.write(batch).await.map_err(delta_err(rel))?;
    let adds = w.flush().await.map_err(delta_err(rel))?;
    tracing::trace!(table = rel, files = adds.len(), seconds = clock.elapsed().as_secs_f64(), "append: files written");
    let mut actions: Vec<Action> = adds.into_iter().map(Action::Add).collect();
    actions.extend(txns.into_iter().map(Action::Txn));
    let partition_by = snapshot.metadata().partition_columns().to_vec();
    let op = DeltaOperation::Write { mode: SaveMode::Append, partition_by: Some(partition_by), predicate: None };
    Ok(commit(&table, rel, actions, metadata, op).await?.0)
}

/// Commits `actions` and `metadata` on top of the table's loaded version. Returns the new
/// version and the table at it (the post-commit snapshot, nothing read again). The checkpoint the table is
/// due (every `delta.checkpointInterval` versions) is written off the commit path, see
/// [`maintain`].
pub(crate) async fn commit(
    table: &DeltaTable,
    rel: &str,
    actions: Vec<Action>,
    metadata: HashMap<String, Value>,
    op: DeltaOperation,
) -> Result<(i64, DeltaTable), DeltaError> {
    commit_with(table, rel, actions, CommitProperties::default().with_metadata(metadata), op).await
}

/// [`commit`] with the commit's properties (its metadata and application transactions).
pub(crate) async fn commit_with(
    table: &DeltaTable,
    rel: &str,
    actions: Vec<Action>,
    props: CommitProperties,
    op: DeltaOperation,
) -> Result<(i64, DeltaTable), DeltaError> {
    let clock = std::time::Instant::now();
    let snapshot = table.snapshot().map_err(delta_err(rel))?;
    let done = CommitBuilder::from(without_maintenance(props))
        .with_actions(actions)
        .build(Some(snapshot), table.log_store(), op)
        .await
        .map_err(|source| classify(rel, source))?;
    tracing::trace!(table = rel, version = done.version(), seconds = clock.elapsed().as_secs_f64(), "committed");
    let mut after = table.clone();
    after.state = Some(done.snapshot());
    remember_commit(&table.log_store(), table.version(), &after);
    maintain(&after, rel);
    Ok((done.version() as i64, after))
}

/// `props` without delta-rs' post-commit checkpoint and log clean-up: [`maintain`] does both.
pub fn without_maintenance(props: CommitProperties) -> CommitProperties {
    props.with_create_checkpoint(false).with_cleanup_expired_logs(Some(false))
}

/// Checkpoints this process scheduled and has not seen finish.
static MAINTENANCE: std::sync::LazyLock<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> =
    std::sync::LazyLock::new(Default::default);

/// Schedules the checkpoint `table` is due at its version (every `delta.checkpointInterval`
/// versions), then the clean-up of log files past `delta.logRetentionDuration`, as a task off
/// the commit path: a commit is complete and visible without them (a reader replays the JSON
/// commits since the last checkpoint), and writing one took 15–20 ms, longer than the commit of
/// a small table it followed. A failed checkpoint is logged; the next one covers it.
/// [`settle`] waits for them.
pub fn maintain(table: &DeltaTable, rel: &str) {
    use deltalake::table::config::TablePropertiesExt as _;
    let Ok(state) = table.snapshot() else { return };
    let version = state.version();
    let config = state.table_config();
    if !(version + 1).is_multiple_of(config.checkpoint_interval().get()) {
        return;
    }
    let cleanup = config.enable_expired_log_cleanup();
    let (table, rel) = (table.clone(), rel.to_string());
    let task = tokio::spawn(async move {
        let clock = std::time::Instant::now();
        if let Err(e) = deltalake::checkpoints::create_checkpoint(&table, None).await {
            tracing::warn!(table = rel, version, "checkpoint not written (readers replay the log instead): {e}");
            return;
        }
        if cleanup && let Err(e) = deltalake::checkpoints::cleanup_metadata(&table, None).await {
            tracing::warn!(table = rel, version, "expired log files not cleaned up: {e}");
        }
        tracing::debug!(table = rel, version, seconds = clock.elapsed().as_secs_f64(), "checkpoint written");
    });
    let mut pending = MAINTENANCE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    pending.retain(|t| !t.is_finished());
    pending.push(task);
}

/// Waits for the checkpoints this process scheduled (see [`maintain`]); a command calls it
/// before it exits, so it leaves none half done.
pub async fn settle() {
    loop {
        let pending = std::mem::take(&mut *MAINTENANCE.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        if pending.is_empty() {
            return;
        }
        for task in pending {
            let _ = task.await;
        }
    }
}

/// A commit that changes no data and records `metadata` (e.g. the state a derived table is
/// now known to be built from, after a run that found nothing to change).
pub async fn commit_metadata(
    table: &DeltaTable,
    rel: &str,
    metadata: HashMap<String, Value>,
) -> Result<i64, DeltaError> {
    commit_transactions(table, rel, metadata, Vec::new()).await
}

/// A commit that changes no data and records `metadata` and the application transactions
/// `txns` (e.g. a position a reader of the source has reached without a row to write).
pub async fn commit_transactions(
    table: &DeltaTable,
    rel: &str,
    metadata: HashMap<String, Value>,
    txns: Vec<deltalake::kernel::Transaction>,
) -> Result<i64, DeltaError> {
    let op = DeltaOperation::Write { mode: SaveMode::Append, partition_by: None, predicate: None };
    Ok(commit(table, rel, txns.into_iter().map(Action::Txn).collect(), metadata, op).await?.0)
}

pub(crate) fn classify(rel: &str, source: deltalake::DeltaTableError) -> DeltaError {
    let text = source.to_string().to_lowercase();
    if text.contains("already exists")
        || text.contains("conflict")
        || text.contains("version") && text.contains("exist")
    {
        DeltaError::Conflict { table: rel.to_string(), source }
    } else {
        DeltaError::Delta { table: rel.to_string(), source }
    }
}

/// The column of a [`merge_by_key`] source saying what to do with its row: `U` upsert, `D`
/// delete, `I` insert of a key the table does not hold (not looked up: a change data capture
/// knows which keys are new to its source, and so to a table in step with it).
pub const OP_COLUMN: &str = "__weir_op";
/// `__weir_keep_<column>` (boolean) in a [`merge_by_key`] source: keep the table's current value.
pub const KEEP_PREFIX: &str = "__weir_keep_";

/// Rows a [`merge_by_key`] changed in the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeStats {
    pub inserted: u64,
    pub updated: u64,
    pub deleted: u64,
}

/// Applies `source` to the table by the key columns `on` in one commit: rows whose
/// [`OP_COLUMN`] is `U` replace (or insert) the row with their key, `I` insert a key the
/// table does not hold, `D` rows delete it;
/// [`KEEP_PREFIX`] columns keep the table's value where true. Keys must be unique in `source`.
/// A merge-on-read with deletion vectors (see [`crate::dv`]), its files laid out as `layout`
/// says (the default: as they come, with the change data feed; for tables read by key, new
/// rows sorted into small files and no change data feed); the table must exist (a backfill
/// or a full build creates it). With a `scope` (see [`crate::dv::KeyScope`]), the table's
/// rows with a key of it that `source` does not hold are deleted too (in its partition alone
/// when it names one, see [`crate::dv::KeyScope::within`]).
#[allow(clippy::too_many_arguments)]
pub async fn merge_by_key(
    lake: &Lake,
    table: DeltaTable,
    rel: &str,
    source: deltalake::arrow::record_batch::RecordBatch,
    on: &[String],
    writer: deltalake::parquet::file::properties::WriterProperties,
    commit: CommitProperties,
    layout: crate::dv::MergeLayout,
    scope: Option<&crate::dv::KeyScope>,
) -> Result<(DeltaTable, MergeStats), DeltaError> {
    if table.version().is_none() {
        return Err(DeltaError::Delta {
            table: rel.to_string(),
            source: deltalake::DeltaTableError::Generic("a merge needs the table to exist; nothing was written".into()),
        });
    }
    crate::dv::merge_on_read(lake, table, rel, source, on, writer, commit, layout, scope).await
}

/// `b` with `schema`'s columns and field types, by name (a file read back may carry other
/// metadata; a batch built elsewhere other nullability).
pub fn conform(
    schema: &arrow_schema::SchemaRef,
    b: deltalake::arrow::record_batch::RecordBatch,
    rel: &str,
) -> Result<deltalake::arrow::record_batch::RecordBatch, DeltaError> {
    let cols: Vec<deltalake::arrow::array::ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| {
            let c =
                b.column_by_name(f.name()).ok_or_else(|| generic(rel, format!("a file has no column {}", f.name())))?;
            if c.data_type() == f.data_type() {
                Ok(c.clone())
            } else {
                deltalake::arrow::compute::cast(c, f.data_type()).map_err(|e| generic(rel, e))
            }
        })
        .collect::<Result<_, _>>()?;
    deltalake::arrow::record_batch::RecordBatch::try_new(schema.clone(), cols).map_err(|e| generic(rel, e))
}
