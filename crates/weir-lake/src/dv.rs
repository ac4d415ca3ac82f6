//! Merge-on-read by key: a [`crate::merge_by_key`] on a table that exists marks the rows it
//! replaces or deletes in Delta deletion vectors instead of copying every other row of their
//! files, writes the new rows as new files and the change data feed as `_change_data/` files,
//! all in one commit.
//!
//! A day of CDC updates a tenth of the listings, spread over every file: copy-on-write
//! rewrote the whole table for it. Here a batch costs reading the key columns of the files
//! whose key range holds a changed key, the changed rows themselves (their old values feed
//! the change data feed and the columns a source row keeps), and writing what changed.
//!
//! Files do not pile up: in the same commit a file is rewritten without its deleted rows
//! once they are half of it (so a row is copied at most about twice over its file's life),
//! and files of fewer than [`Lake::small_file_rows`] live rows in a partition the batch writes
//! to are folded into its new files (so each batch leaves at most one small file per partition
//! it writes to, and does not touch the others).
//!
//! The first such merge on a table created without deletion vectors upgrades its protocol
//! (reader 3, writer 7, the `deletionVectors` feature) in the same commit. Readers: delta-rs
//! (DataFusion) ≥ 0.27, Spark ≥ 3.4 with Delta 2.4, DuckDB's delta extension.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, StringArray, new_null_array};
use arrow::compute::{cast, concat_batches, interleave};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::row::{RowConverter, SortField};
use deltalake::DeltaTable;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::{Action, Add, AddCDCFile, DeletionVectorDescriptor, MetadataExt as _, StorageType};
use deltalake::parquet::arrow::ProjectionMask;
use deltalake::parquet::arrow::arrow_reader::{RowSelection, RowSelector};
use deltalake::parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStreamBuilder};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::DeltaOperation;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt as _, PutPayload};
use roaring::RoaringTreemap;
use rustc_hash::FxHashMap;
use serde_json::Value;
use weir_core::{IntMap, IntSet};

use crate::delta::{DeltaError, KEEP_PREFIX, MergeStats, OP_COLUMN, delta_err, generic};
use crate::store::Lake;

/// Files with fewer live rows than this are rewritten into a merge's new files, by default
/// (see [`Lake::with_small_file_rows`]).
pub const SMALL_FILE_ROWS: u64 = 8192;
/// The change data feed's column saying what a row is.
const CHANGE_TYPE: &str = "_change_type";
/// The Delta spec's magic number of a serialized `RoaringBitmapArray`.
const DV_MAGIC: u32 = 1681511377;
/// Files read at the same time.
pub(crate) const CONCURRENT_FILES: usize = 4;

/// How a [`crate::merge_by_key`] lays out what it writes. The default: the change data feed,
/// new rows in files as they come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeLayout {
    /// New files sorted by the key (one integer column) and cut evenly into files of at most
    /// this many rows, and files of fewer than half that many live rows folded into them: a
    /// table read by key keeps every file in key order with a narrow key range, so a lookup's
    /// file skipping leaves one file of each merge generation the key was written in.
    pub key_files: Option<usize>,
    /// No `_change_data/` files, and the replaced rows are not read (the source must carry
    /// every column and no keep flag): for a table whose changes no job reads as a feed.
    pub no_change_data: bool,
}

/// Integer keys a merge's source answers for: a row of the table with one of these keys that
/// the source does not hold is deleted by the merge. A derive recomputes a set of keys and
/// merges the rows it got: the keys left without a row go in the same pass over the table's
/// key column, without a delete row per key in the source (built once, shared by every mart
/// of a run). For tables without a change data feed ([`MergeLayout::no_change_data`]) keyed
/// by one integer column.
#[derive(Debug, Clone, Default)]
pub struct KeyScope {
    set: Arc<IntSet>,
    /// The same keys sorted: which files' key ranges hold one.
    pub(crate) sorted: Arc<Vec<i64>>,
    /// (column, value as the log writes it): the merge reads, replaces and deletes rows of this
    /// partition only, the table's other partitions are left as they are.
    partition: Option<(String, String)>,
}

impl KeyScope {
    pub fn new(keys: impl IntoIterator<Item = i64>) -> Self {
        let mut sorted: Vec<i64> = keys.into_iter().collect();
        sorted.sort_unstable();
        sorted.dedup();
        KeyScope { set: Arc::new(IntSet::new(sorted.iter().copied())), sorted: Arc::new(sorted), partition: None }
    }

    /// The same keys, the merge confined to the partition `column = value` (the source's rows
    /// must all be in it): a derive that keeps one partition of a table up to date.
    pub fn within(mut self, column: &str, value: impl Into<String>) -> Self {
        self.partition = Some((column.to_string(), value.into()));
        self
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    pub(crate) fn contains(&self, k: i64) -> bool {
        self.set.contains(k)
    }
}

/// Whether `sorted` holds a value in `lo..=hi`.
pub(crate) fn holds_one_in(sorted: &[i64], lo: i64, hi: i64) -> bool {
    let i = sorted.partition_point(|k| *k < lo);
    sorted.get(i).is_some_and(|k| *k <= hi)
}

/// The add actions of the table's active files (as its snapshot holds them).
pub(crate) async fn active_adds(table: &DeltaTable, rel: &str) -> Result<Vec<Add>, DeltaError> {
    #[allow(deprecated)]
    table
        .get_active_add_actions_by_partitions(&[])
        .map_ok(|f| f.add_action())
        .try_collect()
        .await
        .map_err(delta_err(rel))
}

/// How many of the table's files hold fewer than [`Lake::small_file_rows`] live rows in the
/// partitions `rows` fall in: the files a merge of `rows` folds into its new files. An
/// append-only writer (CDC's insert-only batches) merges instead of appending once they reach
/// a count, so its small files do not pile up. 0 when folding is off (`small_file_rows` 0) or
/// a partition column is not text, an integer or a date.
pub async fn small_files_in_partitions_of(
    lake: &Lake,
    table: &DeltaTable,
    rel: &str,
    rows: &RecordBatch,
) -> Result<usize, DeltaError> {
    let small = lake.small_file_rows();
    if small == 0 || table.version().is_none() {
        return Ok(0);
    }
    let partition_columns = table.snapshot().map_err(delta_err(rel))?.metadata().partition_columns().to_vec();
    let Some(cols) = partition_strings(rows, &partition_columns) else { return Ok(0) };
    let written: HashSet<Vec<Option<String>>> = (0..rows.num_rows()).map(|i| row_values(&cols, i)).collect();
    let mut count = 0;
    for add in active_adds(table, rel).await? {
        // The partition first: a file's statistics are JSON, parsed only for those it may count.
        if !written.contains(&partition_of(&add, &partition_columns)) {
            continue;
        }
        let Some(stats) = add.get_stats().ok().flatten() else { continue };
        let deleted = add.deletion_vector.as_ref().map_or(0, |d| d.cardinality as u64);
        if (stats.num_records as u64).saturating_sub(deleted) < small {
            count += 1;
        }
    }
    Ok(count)
}

/// Whether the table's protocol lists deletion vectors (its files may carry them).
pub fn has_deletion_vectors(table: &DeltaTable) -> bool {
    let Ok(s) = table.snapshot() else { return false };
    let p = s.protocol();
    p.min_reader_version() >= 3
        && p.reader_features().is_some_and(|f| f.iter().any(|f| f.as_ref() == "deletionVectors"))
        && p.writer_features().is_some_and(|f| f.iter().any(|f| f.as_ref() == "deletionVectors"))
}

/// The protocol and metadata actions that enable deletion vectors on the table: reader 3 and
/// writer 7, listing the features the legacy versions implied (as Delta's own upgrade does)
/// plus `deletionVectors`; `delta.enableDeletionVectors = true`.
fn upgrade_actions(table: &DeltaTable, rel: &str) -> Result<Vec<Action>, DeltaError> {
    let snapshot = table.snapshot().map_err(delta_err(rel))?;
    let protocol = snapshot.protocol();
    let mut reader: Vec<String> =
        protocol.reader_features().map(|f| f.iter().map(|f| f.as_ref().to_string()).collect()).unwrap_or_default();
    if protocol.min_reader_version() == 2 {
        reader.push("columnMapping".into());
    }
    let mut writer: Vec<String> =
        protocol.writer_features().map(|f| f.iter().map(|f| f.as_ref().to_string()).collect()).unwrap_or_default();
    let legacy = [
        (2, "appendOnly"),
        (2, "invariants"),
        (3, "checkConstraints"),
        (4, "changeDataFeed"),
        (4, "generatedColumns"),
        (5, "columnMapping"),
        (6, "identityColumns"),
    ];
    if protocol.min_writer_version() < 7 {
        writer.extend(legacy.iter().filter(|(v, _)| protocol.min_writer_version() >= *v).map(|(_, f)| f.to_string()));
    }
    for list in [&mut reader, &mut writer] {
        list.push("deletionVectors".into());
        list.sort();
        list.dedup();
    }
    let json = serde_json::json!({
        "minReaderVersion": 3, "minWriterVersion": 7, "readerFeatures": reader, "writerFeatures": writer,
    });
    let protocol = serde_json::from_value(json).map_err(|e| generic(rel, format!("upgrading the protocol: {e}")))?;
    let metadata = snapshot
        .metadata()
        .clone()
        .add_config_key("delta.enableDeletionVectors".into(), "true".into())
        .map_err(|e| generic(rel, format!("enabling deletion vectors: {e}")))?;
    Ok(vec![Action::Protocol(protocol), Action::Metadata(metadata)])
}

/// A file of the table as the merge sees it.
struct FileState {
    add: Add,
    rows: u64,
    /// Rows deleted before this merge.
    deleted: RoaringTreemap,
}

/// The rows of a file this merge touches: positions in the file and the source rows they
/// match, in position order, and their current values.
struct Matched {
    file: FileState,
    positions: Vec<u64>,
    sources: Vec<u32>,
    /// Positions of rows whose key is in the merge's [`KeyScope`] but not in its source.
    absent: Vec<u64>,
    old: RecordBatch,
    /// The file's live rows no source row matched, when it is rewritten.
    kept: Option<RecordBatch>,
}

/// How [`scan_file`] finds the source's keys in a file (owned: files are scanned by tasks of
/// their own, on every core).
struct Keys {
    on: Vec<String>,
    converter: RowConverter,
    /// The source row of each key, in the converter's row format.
    source_keys: FxHashMap<Box<[u8]>, u32>,
    /// With an integer first key column: the source row of each of its values.
    first_index: Option<IntMap<u32>>,
    /// Read the matched rows' old values (else positions only, when the key allows).
    read_old: bool,
    /// Rows with these keys that the source does not hold are deleted.
    scope: Option<KeyScope>,
}

/// The value of a partition column for every row of a file, in the table's type.
fn partition_array(value: Option<&Option<String>>, field: &Field, n: usize, rel: &str) -> Result<ArrayRef, DeltaError> {
    match value.and_then(|v| v.as_deref()) {
        None => Ok(new_null_array(field.data_type(), n)),
        Some(v) => {
            let s: ArrayRef = Arc::new(StringArray::from(vec![v; n]));
            cast(&s, field.data_type())
                .map_err(|e| generic(rel, format!("partition value {v} of {}: {e}", field.name())))
        }
    }
}

/// `batch` (a file's columns) as the rows of `schema`: partition columns from the file's
/// values, columns the file predates as NULL, types cast to the table's.
pub(crate) fn table_rows(
    batch: &RecordBatch,
    schema: &SchemaRef,
    add: &Add,
    rel: &str,
) -> Result<RecordBatch, DeltaError> {
    let n = batch.num_rows();
    let cols = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => cast(c, f.data_type()).map_err(|e| generic(rel, e)),
            None if add.partition_values.contains_key(f.name()) => {
                partition_array(add.partition_values.get(f.name()), f, n, rel)
            }
            None => Ok(new_null_array(f.data_type(), n)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new_with_options(
        schema.clone(),
        cols,
        &arrow::array::RecordBatchOptions::new().with_row_count(Some(n)),
    )
    .map_err(|e| generic(rel, e))
}

/// Reads a deletion vector this table's log references (stored beside the table, as Weir
/// and Spark write them, or inline).
pub(crate) async fn read_deletion_vector(
    lake: &Lake,
    rel: &str,
    dv: &DeletionVectorDescriptor,
) -> Result<RoaringTreemap, DeltaError> {
    let bad = |m: String| generic(rel, format!("deletion vector {}: {m}", dv.path_or_inline_dv));
    let bitmap = |bytes: &[u8]| -> Result<RoaringTreemap, DeltaError> {
        let magic = bytes.get(..4).map(|m| u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
        if magic != Some(DV_MAGIC) {
            return Err(bad(format!("not a RoaringBitmapArray (magic {magic:?})")));
        }
        RoaringTreemap::deserialize_from(&bytes[4..]).map_err(|e| bad(e.to_string()))
    };
    match dv.storage_type {
        StorageType::Inline => bitmap(&z85::decode(&dv.path_or_inline_dv).map_err(|e| bad(e.to_string()))?),
        StorageType::AbsolutePath => Err(bad("deletion vectors at absolute paths are not supported".into())),
        StorageType::UuidRelativePath => {
            let file = file_name(dv).ok_or_else(|| bad("not a prefix and a Z85-encoded UUID".into()))?;
            let offset = dv.offset.unwrap_or(1) as u64;
            let size = u64::try_from(dv.size_in_bytes).map_err(|e| bad(e.to_string()))?;
            let path = lake.path(&format!("{rel}/{file}"));
            let bytes = lake
                .store()
                .get_range(&path, offset..offset + 4 + size)
                .await
                .map_err(|e| bad(format!("reading {file}: {e}")))?;
            let stored = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as u64;
            if stored != size {
                return Err(bad(format!("{file} holds {stored} bytes where the log says {size}")));
            }
            bitmap(&bytes[4..])
        }
    }
}

/// The file, relative to the table, that holds a deletion vector stored beside the table
/// (`[prefix/]deletion_vector_<uuid>.bin`); None for one inline or at an absolute path.
pub fn file_name(dv: &DeletionVectorDescriptor) -> Option<String> {
    if dv.storage_type != StorageType::UuidRelativePath {
        return None;
    }
    let encoded = &dv.path_or_inline_dv;
    let (prefix, id) = encoded.split_at(encoded.len().checked_sub(20)?);
    let id = uuid::Uuid::from_slice(&z85::decode(id).ok()?).ok()?;
    let name = format!("deletion_vector_{id}.bin");
    Some(if prefix.is_empty() { name } else { format!("{prefix}/{name}") })
}

/// Row selection of `positions` (sorted) in a file of `rows` rows.
fn selection(positions: impl Iterator<Item = u64>, rows: u64) -> RowSelection {
    let ranges = positions.map(|p| p as usize..p as usize + 1);
    RowSelection::from_consecutive_ranges(ranges, rows as usize)
}

/// Everything but `deleted` in a file of `rows` rows.
pub(crate) fn live_selection(deleted: &RoaringTreemap, rows: u64) -> RowSelection {
    let mut selectors = Vec::new();
    let mut at = 0u64;
    for d in deleted.iter().filter(|d| *d < rows) {
        if d > at {
            selectors.push(RowSelector::select((d - at) as usize));
        }
        selectors.push(RowSelector::skip(1));
        at = d + 1;
    }
    if rows > at {
        selectors.push(RowSelector::select((rows - at) as usize));
    }
    RowSelection::from(selectors)
}

/// What the merge reads of one file: its rows `on` matches in the source, and, when the file
/// is rewritten (deleted rows half of it, or a small file to `absorb` into the new files of
/// its partition), its other live rows.
async fn scan_file(
    lake: &Lake,
    rel: &str,
    schema: &SchemaRef,
    keys: &Keys,
    file: FileState,
    absorb: bool,
) -> Result<Option<Matched>, DeltaError> {
    let Keys { on, converter, source_keys, first_index: first_keys, read_old, scope } = keys;
    let read_old = *read_old;
    let path = lake.path(&format!("{rel}/{}", file.add.path));
    let open = || async {
        let reader = ParquetObjectReader::new(lake.store(), path.clone()).with_file_size(file.add.size as u64);
        ParquetRecordBatchStreamBuilder::new(reader).await.map_err(|e| generic(rel, format!("{}: {e}", file.add.path)))
    };
    let builder = open().await?;
    // First pass: the positions whose key may be the source's. With an integer first key
    // column in the file, that column alone (price_log's key adds a timestamp, read only for
    // the rows the first column leaves); else every key column the file holds.
    let first = on[0].as_str();
    let by_first = first_keys.is_some() && builder.schema().column_with_name(first).is_some();
    let in_file: Vec<&str> = on
        .iter()
        .map(String::as_str)
        .filter(|k| builder.schema().column_with_name(k).is_some() && (!by_first || *k == first))
        .collect();
    let mask = ProjectionMask::columns(builder.parquet_schema(), in_file.iter().copied());
    let mut stream = builder
        .with_projection(mask)
        .with_batch_size(64 * 1024)
        .build()
        .map_err(|e| generic(rel, format!("{}: {e}", file.add.path)))?;
    let key_schema = Arc::new(Schema::new(
        on.iter()
            .map(|k| schema.field_with_name(k).cloned().map_err(|e| generic(rel, e)))
            .collect::<Result<Vec<_>, _>>()?,
    ));
    let mut candidates = Vec::new();
    // The candidates' source rows, when the first key column is the whole key.
    let mut candidate_sources = Vec::new();
    let mut absent = Vec::new();
    let mut at = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| generic(rel, format!("{}: {e}", file.add.path)))?;
        match first_keys.as_ref().filter(|_| by_first) {
            Some(set) => {
                let col = cast(batch.column(0), &DataType::Int64).map_err(|e| generic(rel, e))?;
                let col = col.as_any().downcast_ref::<arrow::array::Int64Array>().expect("cast to Int64");
                for (i, k) in col.iter().enumerate() {
                    let p = at + i as u64;
                    let Some(k) = k else { continue };
                    if let Some(s) = set.get(k) {
                        if !file.deleted.contains(p) {
                            candidates.push(p);
                            candidate_sources.push(*s);
                        }
                    } else if scope.as_ref().is_some_and(|scope| scope.contains(k)) && !file.deleted.contains(p) {
                        absent.push(p);
                    }
                }
            }
            None => {
                let keys = table_rows(&batch, &key_schema, &file.add, rel)?;
                let rows = converter.convert_columns(keys.columns()).map_err(|e| generic(rel, e))?;
                for (i, row) in rows.iter().enumerate() {
                    let p = at + i as u64;
                    if source_keys.contains_key(row.as_ref()) && !file.deleted.contains(p) {
                        candidates.push(p);
                    }
                }
            }
        }
        at += batch.num_rows() as u64;
    }
    let read = |sel: RowSelection| async {
        let batches: Vec<RecordBatch> = open()
            .await?
            .with_row_selection(sel)
            .with_batch_size(64 * 1024)
            .build()
            .map_err(|e| generic(rel, format!("{}: {e}", file.add.path)))?
            .try_collect()
            .await
            .map_err(|e| generic(rel, format!("{}: {e}", file.add.path)))?;
        let rows = batches.iter().map(|b| table_rows(b, schema, &file.add, rel)).collect::<Result<Vec<_>, _>>()?;
        concat_batches(schema, &rows).map_err(|e| generic(rel, e))
    };
    // Second pass: the candidates' rows, whole; those whose whole key is the source's match.
    let (mut positions, mut sources, mut taken) = (Vec::new(), Vec::new(), Vec::new());
    let mut old = RecordBatch::new_empty(schema.clone());
    if !read_old && on.len() == 1 && by_first {
        // One integer key: a candidate is a match, and its old values are not needed.
        positions = candidates;
        sources = candidate_sources;
    } else if !candidates.is_empty() {
        let rows = read(selection(candidates.iter().copied(), file.rows)).await?;
        if rows.num_rows() != candidates.len() {
            return Err(generic(
                rel,
                format!("{}: read {} of {} rows", file.add.path, rows.num_rows(), candidates.len()),
            ));
        }
        let keys: Vec<ArrayRef> = on.iter().map(|k| rows.column_by_name(k).expect("a table column").clone()).collect();
        let converted = converter.convert_columns(&keys).map_err(|e| generic(rel, e))?;
        for (j, row) in converted.iter().enumerate() {
            if let Some(s) = source_keys.get(row.as_ref()) {
                positions.push(candidates[j]);
                sources.push(*s);
                taken.push(j as u32);
            }
        }
        old = arrow::compute::take_record_batch(&rows, &arrow::array::UInt32Array::from(taken))
            .map_err(|e| generic(rel, e))?;
    }
    let rewrite = (file.deleted.len() + (positions.len() + absent.len()) as u64) * 2 > file.rows || absorb;
    if positions.is_empty() && absent.is_empty() && !rewrite {
        return Ok(None);
    }
    let kept = if rewrite {
        let mut gone = file.deleted.clone();
        gone.extend(positions.iter().chain(&absent).copied());
        Some(read(live_selection(&gone, file.rows)).await?)
    } else {
        None
    };
    Ok(Some(Matched { file, positions, sources, absent, old, kept }))
}

/// The source's values of the partition columns as Delta writes them in the log (text), when
/// every one is text, an integer or a date (whose text is the same either way).
fn partition_strings(rows: &RecordBatch, columns: &[String]) -> Option<Vec<StringArray>> {
    columns
        .iter()
        .map(|p| {
            let c = rows.column_by_name(p)?;
            let t = c.data_type();
            if !(matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Date32) || t.is_integer()) {
                return None;
            }
            let s = cast(c, &DataType::Utf8).ok()?;
            Some(s.as_any().downcast_ref::<StringArray>()?.clone())
        })
        .collect()
}

/// A file's values of the partition columns, as the log writes them.
fn partition_of(add: &Add, columns: &[String]) -> Vec<Option<String>> {
    columns.iter().map(|p| add.partition_values.get(p).cloned().flatten()).collect()
}

fn row_values(cols: &[StringArray], i: usize) -> Vec<Option<String>> {
    cols.iter().map(|c| c.is_valid(i).then(|| c.value(i).to_string())).collect()
}

/// The integer range of `key` in a file's statistics.
pub(crate) fn key_range(add: &Add, key: &str) -> Option<(i64, i64)> {
    let stats: Value = serde_json::from_str(add.stats.as_deref()?).ok()?;
    Some((stats["minValues"][key].as_i64()?, stats["maxValues"][key].as_i64()?))
}

/// See the module documentation. `source` and `scope` as for [`crate::merge_by_key`]; the
/// table exists.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn merge_on_read(
    lake: &Lake,
    table: DeltaTable,
    rel: &str,
    source: RecordBatch,
    on: &[String],
    writer: WriterProperties,
    props: CommitProperties,
    layout: MergeLayout,
    scope: Option<&KeyScope>,
) -> Result<(DeltaTable, MergeStats), DeltaError> {
    let clock = std::time::Instant::now();
    let snapshot = table.snapshot().map_err(delta_err(rel))?;
    let schema: SchemaRef = snapshot.snapshot().arrow_schema();
    let partition_columns = snapshot.metadata().partition_columns().to_vec();
    let n = source.num_rows();

    // The source: its operations, its rows in the table's columns, and which of their
    // values keep the table's (flagged, or a column the source does not carry).
    let ops = source
        .column_by_name(OP_COLUMN)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| generic(rel, format!("a merge source needs a string column {OP_COLUMN}")))?
        .clone();
    if let Some(bad) = ops.iter().find(|o| !matches!(o, Some("U" | "D" | "I"))) {
        return Err(generic(rel, format!("{OP_COLUMN} {bad:?} is neither U, I nor D")));
    }
    // Rows whose key is looked up in the table: all but inserts of keys it does not hold.
    let looked_up = |i: usize| ops.value(i) != "I";
    if on.is_empty() {
        return Err(generic(rel, "a merge needs key columns"));
    }
    let mut new_cols = Vec::with_capacity(schema.fields().len());
    let mut keep: Vec<Option<BooleanArray>> = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        match source.column_by_name(f.name()) {
            Some(c) => {
                new_cols.push(if c.data_type() == f.data_type() {
                    c.clone()
                } else {
                    cast(c, f.data_type()).map_err(|e| generic(rel, format!("column {}: {e}", f.name())))?
                });
                keep.push(
                    source
                        .column_by_name(&format!("{KEEP_PREFIX}{}", f.name()))
                        .and_then(|k| k.as_any().downcast_ref::<BooleanArray>())
                        .cloned(),
                );
            }
            None => {
                new_cols.push(new_null_array(f.data_type(), n));
                keep.push(Some(BooleanArray::from(vec![true; n])));
            }
        }
    }
    if layout.key_files.is_some() && on.len() != 1 {
        return Err(generic(rel, "a key-ordered merge layout needs one key column"));
    }
    // The replaced rows are read for the change data feed and for the values a source row
    // keeps (a flag, or a column it does not carry); else their positions are enough.
    let read_old = !layout.no_change_data || keep.iter().any(Option::is_some) || on.len() != 1;
    // Nullable throughout: a delete carries its key alone.
    let loose = Arc::new(Schema::new(
        schema.fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect::<Vec<_>>(),
    ));
    let new_rows = RecordBatch::try_new_with_options(
        loose,
        new_cols,
        &arrow::array::RecordBatchOptions::new().with_row_count(Some(n)),
    )
    .map_err(|e| generic(rel, e))?;
    let key_fields: Vec<SortField> = on
        .iter()
        .map(|k| schema.field_with_name(k).map(|f| SortField::new(f.data_type().clone())).map_err(|e| generic(rel, e)))
        .collect::<Result<_, _>>()?;
    let converter = RowConverter::new(key_fields).map_err(|e| generic(rel, e))?;
    let key_cols: Vec<ArrayRef> =
        on.iter().map(|k| new_rows.column_by_name(k).expect("a table column").clone()).collect();
    let source_rows = converter.convert_columns(&key_cols).map_err(|e| generic(rel, e))?;
    let mut source_keys: FxHashMap<Box<[u8]>, u32> = FxHashMap::with_capacity_and_hasher(n, Default::default());
    for (i, r) in source_rows.iter().enumerate() {
        if source_keys.insert(r.data().into(), i as u32).is_some() {
            return Err(generic(rel, format!("a merge source holds a key twice (row {i})")));
        }
    }
    // The source row of each first-key value looked up (with one integer key column, the row
    // itself), when that column is an integer without NULLs.
    let first_index: Option<IntMap<u32>> = key_cols[0].data_type().is_integer().then_some(()).and_then(|_| {
        let c = cast(&key_cols[0], &DataType::Int64).ok()?;
        let c = c.as_any().downcast_ref::<arrow::array::Int64Array>()?;
        let entries: Option<Vec<(i64, u32)>> =
            (0..n).filter(|&i| looked_up(i)).map(|i| c.is_valid(i).then(|| (c.value(i), i as u32))).collect();
        Some(IntMap::new(entries?))
    });
    // A scope's partition confines the merge, even with no key to delete.
    let within = scope.and_then(|s| s.partition.clone());
    if let Some((column, _)) = &within
        && !partition_columns.contains(column)
    {
        return Err(generic(
            rel,
            format!("a merge confined to a partition of {column}: the table is not partitioned by it"),
        ));
    }
    let scope = scope.filter(|s| !s.is_empty());
    if scope.is_some() && (first_index.is_none() || on.len() != 1 || read_old) {
        return Err(generic(
            rel,
            "deleting a key scope's rows needs one integer key column without NULLs and no change data feed",
        ));
    }
    // Files whose integer key range holds no key looked up (nor one of the scope) are not read.
    let first_key: Option<Vec<i64>> = first_index.as_ref().map(|index| {
        let mut v: Vec<i64> = index.keys().collect();
        v.sort_unstable();
        v
    });

    let adds = active_adds(&table, rel).await?;
    let files_total = adds.len();
    let small_file_rows = match layout.key_files {
        Some(rows) => lake.small_file_rows().min(rows as u64 / 2),
        None => lake.small_file_rows(),
    };
    // The partitions the source's rows are in, when its key holds every partition column (a
    // month partition derived from a key column): files of other partitions cannot match.
    let in_key = !partition_columns.is_empty() && partition_columns.iter().all(|p| on.contains(p));
    let part_values = partition_strings(&new_rows, &partition_columns);
    let partitions: Option<HashSet<Vec<Option<String>>>> =
        part_values.as_ref().filter(|_| in_key).map(|cols| (0..n).map(|i| row_values(cols, i)).collect());
    // The partitions the merge writes new rows to: a small file there is folded into them.
    let written: Option<HashSet<Vec<Option<String>>>> =
        part_values.as_ref().map(|cols| (0..n).filter(|&i| ops.value(i) != "D").map(|i| row_values(cols, i)).collect());
    if let Some((column, value)) = &within {
        let i = partition_columns.iter().position(|p| p == column).expect("checked above");
        // Deletes carry their key alone: they are confined by the files read.
        let mut rows = (0..n).filter(|&r| ops.value(r) != "D");
        let outside = match &part_values {
            Some(cols) => rows.any(|r| !cols[i].is_valid(r) || cols[i].value(r) != value),
            None => rows.next().is_some(),
        };
        if outside {
            return Err(generic(rel, format!("a merge confined to {column}={value} has source rows outside it")));
        }
    }
    let mut candidates = Vec::new();
    for add in adds {
        let rows = add
            .get_stats()
            .ok()
            .flatten()
            .map(|s| s.num_records as u64)
            .ok_or_else(|| generic(rel, format!("{} has no row count in its statistics", add.path)))?;
        let deleted_rows = add.deletion_vector.as_ref().map_or(0, |d| d.cardinality as u64);
        let values = partition_of(&add, &partition_columns);
        let absorb = rows.saturating_sub(deleted_rows) < small_file_rows
            && written.as_ref().is_some_and(|w| w.contains(&values));
        let may_hold = match (&first_key, key_range(&add, &on[0])) {
            (Some(keys), Some((lo, hi))) => {
                holds_one_in(keys, lo, hi) || scope.is_some_and(|s| holds_one_in(&s.sorted, lo, hi))
            }
            _ => true,
        };
        let in_partition = partitions.as_ref().is_none_or(|set| set.contains(&values));
        let within =
            within.as_ref().is_none_or(|(c, v)| add.partition_values.get(c).cloned().flatten().as_ref() == Some(v));
        if within && ((may_hold && in_partition) || absorb) {
            candidates.push((add, rows, absorb));
        }
    }
    let files_read = candidates.len();
    let keys = Arc::new(Keys { on: on.to_vec(), converter, source_keys, first_index, read_old, scope: scope.cloned() });
    let matched: Vec<Matched> = futures::stream::iter(candidates)
        .map(|(add, rows, absorb)| {
            let (lake, rel_owned, schema, keys) = (lake.clone(), rel.to_string(), schema.clone(), keys.clone());
            // A task per file: decoding is most of a scan, and the runtime's threads share it.
            let task = tokio::spawn(async move {
                let rel = rel_owned.as_str();
                let deleted = match &add.deletion_vector {
                    Some(dv) => read_deletion_vector(&lake, rel, dv).await?,
                    None => RoaringTreemap::new(),
                };
                let file = FileState { add, rows, deleted };
                scan_file(&lake, rel, &schema, &keys, file, absorb).await
            });
            async move { task.await.map_err(|e| generic(rel, format!("a file scan failed: {e}")))? }
        })
        .buffer_unordered(CONCURRENT_FILES)
        .try_filter_map(|m| async move { Ok(m) })
        .try_collect()
        .await?;
    let scanned = clock.elapsed();

    // Old values by source row: (batch of `matched`, row in it).
    let mut old_of: Vec<Option<(usize, usize)>> = vec![None; n];
    for (b, m) in matched.iter().enumerate() {
        for (r, s) in m.sources.iter().enumerate() {
            old_of[*s as usize] = Some((b, r));
        }
    }
    let mut stats = MergeStats::default();
    // What the merge writes, by where each row's values are: inserts and updates (the data
    // files), and with the change data feed the updates' old rows and the deleted rows.
    let (mut inserts, mut posts, mut pres, mut deletes) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, old) in old_of.iter().enumerate() {
        let upsert = ops.value(i) != "D";
        match (upsert, *old) {
            (true, Some((b, r))) => {
                stats.updated += 1;
                pres.push(RowRef::Old(b as u32, r as u32));
                posts.push(RowRef::Post(i as u32));
            }
            (true, None) => {
                stats.inserted += 1;
                inserts.push(RowRef::New(i as u32));
            }
            (false, Some((b, r))) => {
                stats.deleted += 1;
                deletes.push(RowRef::Old(b as u32, r as u32));
            }
            (false, None) => {}
        }
    }
    stats.deleted += matched.iter().map(|m| m.absent.len() as u64).sum::<u64>();
    // Nothing matched and nothing new (deletes of keys the table does not hold): a commit
    // with the transaction alone. Rewriting small files then would read as changed rows to
    // a change-feed reader (a commit without change files is read from its adds and removes).
    let changed = stats.inserted + stats.updated + stats.deleted > 0;
    let matched: Vec<Matched> = if changed { matched } else { Vec::new() };
    let mut actions: Vec<Action> = Vec::new();
    if !has_deletion_vectors(&table) {
        actions.extend(upgrade_actions(&table, rel)?);
    }

    // Each column of the new files is copied once, from where its values are, in the
    // files' order (by partition, then by key with `key_files`).
    let empty = RecordBatch::new_empty(schema.clone());
    let gather = Gather {
        batches: std::iter::once(&new_rows)
            .chain(matched.iter().map(|m| &m.old))
            .chain(matched.iter().map(|m| m.kept.as_ref().unwrap_or(&empty)))
            .collect(),
        matched: matched.len(),
        keep: &keep,
        old_of: &old_of,
    };
    let mut rows: Vec<RowRef> = inserts.iter().chain(&posts).copied().collect();
    for (k, m) in matched.iter().enumerate() {
        rows.extend((0..m.kept.as_ref().map_or(0, RecordBatch::num_rows)).map(|r| RowRef::Kept(k as u32, r as u32)));
    }
    let key_files = layout.key_files.map(|rows| (on[0].as_str(), rows));
    let parts: Vec<&str> = partition_columns.iter().map(String::as_str).collect();
    let rows = gather.ordered(&schema, rows, &parts, key_files.map(|(key, _)| key)).map_err(|e| generic(rel, e))?.0;
    let data = gather.batch(&schema, &rows, None).map_err(|e| generic(rel, e))?;
    let data_pieces = file_pieces(&data, &partition_columns, key_files).map_err(|e| generic(rel, e))?;

    // The change data feed: its files one per partition like the new files, all encoded at
    // the same time as those (one writer for every change row was the longest task of a
    // merge).
    let change_schema = Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .cloned()
            .chain([Arc::new(Field::new(CHANGE_TYPE, DataType::Utf8, true))])
            .collect::<Vec<_>>(),
    ));
    let change_target = Target::ChangeData {
        url: format!("{}/_change_data", lake.table_url(rel).as_str().trim_end_matches('/')),
        schema: change_schema.clone(),
        partition_columns: partition_columns.clone(),
        options: lake.storage_options().clone(),
    };
    let change_pieces = if layout.no_change_data {
        Vec::new()
    } else {
        let mut rows = Vec::new();
        let mut kinds = Vec::new();
        for (kind, of) in
            [("insert", &inserts), ("update_preimage", &pres), ("update_postimage", &posts), ("delete", &deletes)]
        {
            rows.extend(of.iter().copied());
            kinds.extend(std::iter::repeat_n(kind, of.len()));
        }
        let (rows, order) = gather.ordered(&schema, rows, &parts, None).map_err(|e| generic(rel, e))?;
        let kinds: StringArray = match order {
            Some(order) => order.iter().map(|&i| Some(kinds[i])).collect(),
            None => kinds.into_iter().map(Some).collect(),
        };
        let all = gather.batch(&change_schema, &rows, Some(Arc::new(kinds))).map_err(|e| generic(rel, e))?;
        file_pieces(&all, &partition_columns, None).map_err(|e| generic(rel, e))?
    };
    let gathered = clock.elapsed();
    // Both are awaited even when one fails: no file is left being written behind the error.
    let (written, changed) = futures::join!(
        write_pieces(Target::Table(Arc::new(table.clone())), rel, &writer, data_pieces),
        write_pieces(change_target, rel, &writer, change_pieces),
    );
    let new_files = written.as_ref().map_or(0, Vec::len);
    let encoded = clock.elapsed();
    actions.extend(written?.into_iter().map(Action::Add));
    for a in changed? {
        actions.push(Action::Cdc(AddCDCFile {
            path: format!("_change_data/{}", a.path),
            size: a.size,
            partition_values: a.partition_values,
            data_change: false,
            tags: None,
        }));
    }

    // Retire what changed: rewritten files go, the others get a deletion vector with the
    // rows this merge replaced or deleted added, all in one file beside the table.
    let mut dv_bytes: Vec<u8> = Vec::new();
    let dv_id = uuid::Uuid::new_v4();
    let mut dv_files = 0usize;
    {
        use delta_kernel::actions::deletion_vector_writer::{KernelDeletionVector, StreamingDeletionVectorWriter};
        let mut dvw = StreamingDeletionVectorWriter::new(&mut dv_bytes);
        for m in &matched {
            let old_remove = remove_of(&m.file.add);
            actions.push(Action::Remove(old_remove));
            let mut gone = m.file.deleted.clone();
            gone.extend(m.positions.iter().chain(&m.absent).copied());
            if m.kept.is_some() || gone.len() >= m.file.rows {
                continue;
            }
            let mut dv = KernelDeletionVector::new();
            dv.add_deleted_row_indexes(gone.iter());
            let written = dvw.write_deletion_vector(dv).map_err(|e| generic(rel, e))?;
            dv_files += 1;
            let mut add = m.file.add.clone();
            add.deletion_vector = Some(DeletionVectorDescriptor {
                storage_type: StorageType::UuidRelativePath,
                path_or_inline_dv: z85::encode(dv_id.as_bytes()),
                offset: Some(written.offset),
                size_in_bytes: written.size_in_bytes,
                cardinality: written.cardinality,
            });
            add.data_change = true;
            add.modification_time = chrono::Utc::now().timestamp_millis();
            add.stats = add.stats.as_deref().and_then(loose_bounds);
            actions.push(Action::Add(add));
        }
        dvw.finalize().map_err(|e| generic(rel, e))?;
    }
    if dv_files > 0 {
        let path = lake.path(&format!("{rel}/deletion_vector_{dv_id}.bin"));
        lake.store()
            .put(&path, PutPayload::from(dv_bytes))
            .await
            .map_err(|e| generic(rel, format!("writing {path}: {e}")))?;
    }
    let written = clock.elapsed();
    let op = DeltaOperation::Merge {
        predicate: None,
        merge_predicate: Some(format!("key ({}) match, deletion vectors", on.join(", "))),
        matched_predicates: vec![],
        not_matched_predicates: vec![],
        not_matched_by_source_predicates: vec![],
    };
    let (_, after) = crate::delta::commit_with(&table, rel, actions, props, op).await?;
    tracing::trace!(
        table = rel,
        files = files_total,
        files_read,
        files_rewritten = matched.iter().filter(|m| m.kept.is_some()).count(),
        deletion_vectors = dv_files,
        inserted = stats.inserted,
        updated = stats.updated,
        deleted = stats.deleted,
        new_files,
        scan_ms = scanned.as_millis() as u64,
        write_ms = (written - scanned).as_millis() as u64,
        gather_ms = (gathered - scanned).as_millis() as u64,
        files_ms = (encoded - gathered).as_millis() as u64,
        retire_ms = (written - encoded).as_millis() as u64,
        total_ms = clock.elapsed().as_millis() as u64,
        "merged on read"
    );
    Ok((after, stats))
}

/// The new rows (sorted by the partition columns, then by the key with `key_files`) cut
/// into the files a merge writes: one per partition, or with `key_files` = (key, rows) each
/// partition's rows cut evenly into files of at most `rows` rows.
fn file_pieces(
    sorted: &RecordBatch,
    partition_columns: &[String],
    key_files: Option<(&str, usize)>,
) -> Result<Vec<RecordBatch>, arrow::error::ArrowError> {
    if sorted.num_rows() == 0 {
        return Ok(Vec::new());
    }
    let mut pieces = Vec::new();
    for run in partition_runs(sorted, partition_columns)? {
        let rows = sorted.slice(run.start, run.end - run.start);
        let Some((_, file_rows)) = key_files else {
            pieces.push(rows);
            continue;
        };
        // Cut evenly: no file far below the others.
        let n = rows.num_rows().div_ceil(file_rows.max(1));
        let per = rows.num_rows().div_ceil(n);
        let mut offset = 0;
        while offset < rows.num_rows() {
            let len = per.min(rows.num_rows() - offset);
            pieces.push(rows.slice(offset, len));
            offset += len;
        }
    }
    Ok(pieces)
}

/// A row a merge writes, by where its values are.
#[derive(Debug, Clone, Copy)]
enum RowRef {
    /// Source row `i` as it is (an insert).
    New(u32),
    /// Row `r` of `matched[b].old` (an update's old row, a deleted row).
    Old(u32, u32),
    /// Source row `i` over the table's row it replaces: the table's value in a column the
    /// source row keeps (an update).
    Post(u32),
    /// Row `r` of `matched[b].kept` (a live row of a rewritten file).
    Kept(u32, u32),
}

/// Where a merge's rows are, for `interleave`: batch 0 the source's rows, 1 + b
/// `matched[b].old`, 1 + matched + b `matched[b].kept` (empty when the file is not
/// rewritten).
struct Gather<'a> {
    batches: Vec<&'a RecordBatch>,
    matched: usize,
    keep: &'a [Option<BooleanArray>],
    old_of: &'a [Option<(usize, usize)>],
}

/// Where each of a set of rows is for [`interleave`]: (batch, row) in every column but those
/// an updated row keeps, and the updated rows (their place in the set, their source row),
/// looked up again in those columns only.
struct Placed {
    idx: Vec<(usize, usize)>,
    posts: Vec<(usize, usize)>,
}

impl Gather<'_> {
    /// Where `rows` are (one pass; a pass per column was most of a gather's time).
    fn place(&self, rows: &[RowRef]) -> Placed {
        let mut posts = Vec::new();
        let idx = rows
            .iter()
            .enumerate()
            .map(|(p, row)| match *row {
                RowRef::New(i) => (0, i as usize),
                RowRef::Old(b, r) => (1 + b as usize, r as usize),
                RowRef::Post(i) => {
                    posts.push((p, i as usize));
                    (0, i as usize)
                }
                RowRef::Kept(b, r) => (1 + self.matched + b as usize, r as usize),
            })
            .collect();
        Placed { idx, posts }
    }

    /// Column `c` of the rows `at`, one copy.
    fn column(&self, c: usize, at: &Placed) -> Result<ArrayRef, arrow::error::ArrowError> {
        let arrays: Vec<&dyn Array> = self.batches.iter().map(|b| b.column(c).as_ref()).collect();
        match &self.keep[c] {
            Some(k) if !at.posts.is_empty() => {
                let mut idx = at.idx.clone();
                for &(p, i) in &at.posts {
                    if let Some((b, r)) = self.old_of[i]
                        && k.is_valid(i)
                        && k.value(i)
                    {
                        idx[p] = (1 + b, r);
                    }
                }
                interleave(&arrays, &idx)
            }
            _ => interleave(&arrays, &at.idx),
        }
    }

    /// `rows` in the order of the files they go to: grouped by the `partitions` columns of
    /// `schema`, by the integer `key` within a partition when given (as they are when there
    /// is neither), and the order they were put in (each sorted row's place in `rows`).
    fn ordered(
        &self,
        schema: &Schema,
        rows: Vec<RowRef>,
        partitions: &[&str],
        key: Option<&str>,
    ) -> Result<(Vec<RowRef>, Option<Vec<usize>>), arrow::error::ArrowError> {
        if (partitions.is_empty() && key.is_none()) || rows.len() < 2 {
            return Ok((rows, None));
        }
        let at = self.place(&rows);
        let column = |name: &&str| self.column(schema.index_of(name)?, &at);
        let parts = partitions.iter().map(column).collect::<Result<Vec<_>, _>>()?;
        let key = key.as_ref().map(column).transpose()?;
        let order = file_order(&parts, key.as_ref(), rows.len())?;
        Ok((order.iter().map(|&i| rows[i]).collect(), Some(order)))
    }

    /// `rows` in `schema`'s columns (the table's, then `last` when given).
    fn batch(
        &self,
        schema: &SchemaRef,
        rows: &[RowRef],
        last: Option<ArrayRef>,
    ) -> Result<RecordBatch, arrow::error::ArrowError> {
        let table_columns = schema.fields().len() - usize::from(last.is_some());
        let at = self.place(rows);
        let mut cols = (0..table_columns).map(|c| self.column(c, &at)).collect::<Result<Vec<_>, _>>()?;
        cols.extend(last);
        RecordBatch::try_new_with_options(
            schema.clone(),
            cols,
            &arrow::array::RecordBatchOptions::new().with_row_count(Some(rows.len())),
        )
    }
}

/// The order of `n` rows by their values of `parts` (a few distinct ones: the partitions),
/// then by `key` (an integer column; NULL first) within each: each partition's rows keep
/// their order when there is no key. A comparison sort of the rows by the partitions' text
/// was most of a merge's gather; here each row's partition is looked up once, and the rows
/// are bucketed (or sorted by a pair of integers with a key).
fn file_order(parts: &[ArrayRef], key: Option<&ArrayRef>, n: usize) -> Result<Vec<usize>, arrow::error::ArrowError> {
    // Each row's partition, ranked in the partitions' value order.
    let mut group = vec![0u32; n];
    let mut groups = 1usize;
    if !parts.is_empty() {
        let converter = RowConverter::new(parts.iter().map(|p| SortField::new(p.data_type().clone())).collect())?;
        let values = converter.convert_columns(parts)?;
        let mut ids: FxHashMap<&[u8], u32> = FxHashMap::default();
        for (i, row) in values.iter().enumerate() {
            let next = ids.len() as u32;
            group[i] = *ids.entry(row.data()).or_insert(next);
        }
        let mut distinct: Vec<(&[u8], u32)> = ids.into_iter().collect();
        distinct.sort_unstable();
        let mut rank = vec![0u32; distinct.len()];
        for (r, (_, id)) in distinct.iter().enumerate() {
            rank[*id as usize] = r as u32;
        }
        for g in &mut group {
            *g = rank[*g as usize];
        }
        groups = distinct.len();
    }
    let Some(key) = key else {
        let mut start = vec![0usize; groups + 1];
        for &g in &group {
            start[g as usize + 1] += 1;
        }
        for g in 0..groups {
            start[g + 1] += start[g];
        }
        let mut order = vec![0usize; n];
        for (i, &g) in group.iter().enumerate() {
            order[start[g as usize]] = i;
            start[g as usize] += 1;
        }
        return Ok(order);
    };
    if !key.data_type().is_integer() {
        return Err(arrow::error::ArrowError::InvalidArgumentError(format!(
            "files in key order need an integer key, not {}",
            key.data_type()
        )));
    }
    let key = cast(key, &DataType::Int64)?;
    let key = key.as_any().downcast_ref::<arrow::array::Int64Array>().expect("cast to Int64");
    let mut sorted: Vec<(u32, Option<i64>, u32)> =
        (0..n).map(|i| (group[i], key.is_valid(i).then(|| key.value(i)), i as u32)).collect();
    sorted.sort_unstable();
    Ok(sorted.into_iter().map(|(_, _, i)| i as usize).collect())
}

/// The ranges of `batch`'s rows (sorted by `columns`) over which those columns keep one
/// value: one range per partition; the whole batch when `columns` is empty.
pub fn partition_runs(
    batch: &RecordBatch,
    columns: &[String],
) -> Result<Vec<std::ops::Range<usize>>, arrow::error::ArrowError> {
    if columns.is_empty() || batch.num_rows() == 0 {
        return Ok(std::iter::once(0..batch.num_rows()).collect());
    }
    let arrays: Vec<ArrayRef> = columns
        .iter()
        .map(|c| {
            batch
                .column_by_name(c)
                .cloned()
                .ok_or_else(|| arrow::error::ArrowError::SchemaError(format!("no column {c}")))
        })
        .collect::<Result<_, _>>()?;
    Ok(arrow::compute::partition(&arrays)?.ranges())
}

/// Where [`write_pieces`] writes: the table's data files, or its change data files.
enum Target {
    Table(Arc<DeltaTable>),
    ChangeData {
        url: String,
        schema: SchemaRef,
        partition_columns: Vec<String>,
        options: std::collections::HashMap<String, String>,
    },
}

/// Writes each piece as a file of `target` (one partition's rows each), encoded by tasks of
/// their own: Parquet encoding is most of a merge's writing, and the runtime's threads
/// share it.
async fn write_pieces(
    target: Target,
    rel: &str,
    writer: &WriterProperties,
    pieces: Vec<RecordBatch>,
) -> Result<Vec<Add>, DeltaError> {
    let target = Arc::new(target);
    let written: Vec<Vec<Add>> = futures::stream::iter(pieces)
        .map(|piece| {
            let (target, writer, rel_owned) = (target.clone(), writer.clone(), rel.to_string());
            let task = tokio::spawn(async move {
                let rel = rel_owned.as_str();
                let w = match target.as_ref() {
                    Target::Table(table) => RecordBatchWriter::for_table(table),
                    Target::ChangeData { url, schema, partition_columns, options } => RecordBatchWriter::try_new(
                        url.clone(),
                        schema.clone(),
                        Some(partition_columns.clone()),
                        Some(options.clone()),
                    ),
                };
                let mut w = w.map_err(delta_err(rel))?.with_writer_properties(writer);
                w.write(piece).await.map_err(delta_err(rel))?;
                w.flush().await.map_err(delta_err(rel))
            });
            async move { task.await.map_err(|e| generic(rel, format!("writing a file failed: {e}")))? }
        })
        .buffered(CONCURRENT_FILES)
        .try_collect()
        .await?;
    Ok(written.into_iter().flatten().collect())
}

/// The remove action of an active file, its deletion vector included (a remove matches the
/// add with the same path and deletion vector).
fn remove_of(add: &Add) -> deltalake::kernel::Remove {
    deltalake::kernel::Remove {
        path: add.path.clone(),
        data_change: true,
        deletion_timestamp: Some(chrono::Utc::now().timestamp_millis()),
        extended_file_metadata: Some(true),
        size: Some(add.size),
        partition_values: Some(add.partition_values.clone()),
        deletion_vector: add.deletion_vector.clone(),
        tags: None,
        base_row_id: None,
        default_row_commit_version: None,
    }
}

/// A file's statistics once rows of it are deleted: its min and max may no longer be
/// reached (`tightBounds: false`); `numRecords` still counts every row of the file.
fn loose_bounds(stats: &str) -> Option<String> {
    let mut v: Value = serde_json::from_str(stats).ok()?;
    v.as_object_mut()?.insert("tightBounds".into(), Value::Bool(false));
    serde_json::to_string(&v).ok()
}
