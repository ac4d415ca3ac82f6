//! Copy-on-write by key for tables stored in key order in files of disjoint key ranges (the
//! marts): an update rewrites only the files whose key range holds a changed key, and keeps
//! every file sorted by the key, so page-index lookups stay one page per column.

use arrow::array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch};
use arrow::compute::{SortOptions, cast, concat_batches, filter_record_batch, sort_to_indices, take_record_batch};
use arrow::datatypes::{DataType, SchemaRef};
use deltalake::DeltaTable;
use deltalake::kernel::Action;
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::DeltaOperation;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use serde_json::Value;
use std::collections::{HashMap, HashSet};

use crate::delta::{DeltaError, generic};
use crate::store::Lake;

/// What a [`rewrite_by_key`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewriteStats {
    pub files_read: usize,
    pub files_written: usize,
    pub rows_written: u64,
    pub upserted: u64,
    pub deleted: u64,
}

/// The integer keys of `a` (any integer type).
fn int_keys(a: &ArrayRef, rel: &str) -> Result<Int64Array, DeltaError> {
    if !a.data_type().is_integer() {
        return Err(generic(rel, format!("a rewrite by key needs an integer key, not {}", a.data_type())));
    }
    let c = cast(a, &DataType::Int64).map_err(|e| generic(rel, e))?;
    Ok(c.as_any().downcast_ref::<Int64Array>().expect("cast to Int64").clone())
}

/// One active file: its path under the table, its key range (when its statistics have one),
/// and the remove action that retires it.
struct File {
    path: String,
    range: Option<(i64, i64)>,
    remove: deltalake::kernel::Remove,
}

/// Replaces the rows of `upserts` (one per key, the table's columns) and deletes the rows
/// whose key is in `deletes`, in one commit that removes only the files whose key range holds
/// one of those keys (a new key joins the file whose range precedes it) and adds them
/// rewritten, sorted by `key`, in files of at most `file_rows` rows. The table must be
/// unpartitioned with an integer key; `metadata` goes into the commit.
#[allow(clippy::too_many_arguments)]
pub async fn rewrite_by_key(
    lake: &Lake,
    table: DeltaTable,
    rel: &str,
    key: &str,
    upserts: RecordBatch,
    deletes: &[i64],
    file_rows: usize,
    writer: WriterProperties,
    metadata: HashMap<String, Value>,
) -> Result<(i64, RewriteStats), DeltaError> {
    let snapshot = table.snapshot().map_err(|e| DeltaError::Delta { table: rel.to_string(), source: e })?;
    if !snapshot.metadata().partition_columns().is_empty() {
        return Err(generic(rel, "a rewrite by key needs an unpartitioned table"));
    }
    let schema: SchemaRef = upserts.schema();
    let keys_of = |b: &RecordBatch| -> Result<Int64Array, DeltaError> {
        int_keys(b.column_by_name(key).ok_or_else(|| generic(rel, format!("no key column {key}")))?, rel)
    };
    let upsert_keys = keys_of(&upserts)?;
    let mut files: Vec<File> = table
        .get_active_add_actions_by_partitions(&[])
        .map_ok(|f| {
            let range = f
                .stats()
                .and_then(|s| serde_json::from_str::<Value>(&s).ok())
                .and_then(|s| Some((s["minValues"][key].as_i64()?, s["maxValues"][key].as_i64()?)));
            File { path: f.path().to_string(), range, remove: f.remove_action(true) }
        })
        .try_collect()
        .await
        .map_err(|e| DeltaError::Delta { table: rel.to_string(), source: e })?;
    files.sort_by_key(|f| f.range.map(|r| r.0));

    // Which file each upsert goes to, and which files are touched at all. Without disjoint
    // key ranges (files of another writer), every file is rewritten.
    let ranged = files.iter().all(|f| f.range.is_some())
        && files.windows(2).all(|w| w[0].range.expect("some").1 < w[1].range.expect("some").0);
    let mut touched = vec![!ranged; files.len()];
    let mut assigned: Vec<Vec<u32>> = vec![Vec::new(); files.len().max(1)];
    for (i, k) in upsert_keys.iter().enumerate() {
        let k = k.ok_or_else(|| generic(rel, format!("an upsert has a NULL {key}")))?;
        let at = if ranged {
            // The last file starting at or before k (the first file for a key before all).
            files.partition_point(|f| f.range.expect("ranged").0 <= k).saturating_sub(1)
        } else {
            0
        };
        if let Some(t) = touched.get_mut(at) {
            *t = true;
        }
        assigned[at].push(i as u32);
    }
    let delete_set: HashSet<i64> = deletes.iter().copied().collect();
    if ranged {
        for (f, t) in files.iter().zip(touched.iter_mut()) {
            let (lo, hi) = f.range.expect("ranged");
            *t |= deletes.iter().any(|d| (lo..=hi).contains(d));
        }
    }
    let replaced: HashSet<i64> = upsert_keys.iter().flatten().chain(deletes.iter().copied()).collect();

    let store = lake.store();
    let mut stats = RewriteStats { upserted: upserts.num_rows() as u64, ..Default::default() };
    let mut actions: Vec<Action> = Vec::new();
    let mut writer_opt: Option<RecordBatchWriter> = None;
    let groups = if files.is_empty() { 1 } else { files.len() };
    for g in 0..groups {
        let file = files.get(g);
        if file.is_some() && !touched[g] {
            continue;
        }
        let mut parts: Vec<RecordBatch> = Vec::new();
        if let Some(f) = file {
            let bytes = store
                .get(&lake.path(&format!("{rel}/{}", f.path)))
                .await
                .map_err(|e| generic(rel, format!("reading {}: {e}", f.path)))?
                .bytes()
                .await
                .map_err(|e| generic(rel, format!("reading {}: {e}", f.path)))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
                .and_then(|b| b.with_batch_size(64 * 1024).build())
                .map_err(|e| generic(rel, format!("reading {}: {e}", f.path)))?;
            stats.files_read += 1;
            for batch in reader {
                let batch = batch.map_err(|e| generic(rel, format!("reading {}: {e}", f.path)))?;
                let ks = keys_of(&batch)?;
                let keep: BooleanArray = ks.iter().map(|k| Some(k.is_none_or(|k| !replaced.contains(&k)))).collect();
                stats.deleted += ks.iter().flatten().filter(|k| delete_set.contains(k)).count() as u64;
                let kept = filter_record_batch(&batch, &keep).map_err(|e| generic(rel, e))?;
                parts.push(conform(&schema, kept, rel)?);
            }
            actions.push(Action::Remove(f.remove.clone()));
        }
        if !assigned[g].is_empty() {
            let idx = arrow::array::UInt32Array::from(std::mem::take(&mut assigned[g]));
            parts.push(take_record_batch(&upserts, &idx).map_err(|e| generic(rel, e))?);
        }
        let all = concat_batches(&schema, &parts).map_err(|e| generic(rel, e))?;
        if all.num_rows() == 0 {
            continue;
        }
        let order = sort_to_indices(
            all.column_by_name(key).expect("checked"),
            Some(SortOptions { descending: false, nulls_first: false }),
            None,
        )
        .map_err(|e| generic(rel, e))?;
        let sorted = take_record_batch(&all, &order).map_err(|e| generic(rel, e))?;
        let w = match &mut writer_opt {
            Some(w) => w,
            None => writer_opt.insert(
                RecordBatchWriter::try_new(
                    lake.table_url(rel).as_str(),
                    schema.clone(),
                    None,
                    Some(lake.storage_options().clone()),
                )
                .map_err(|e| DeltaError::Delta { table: rel.to_string(), source: e })?
                .with_writer_properties(writer.clone()),
            ),
        };
        // Split evenly: a file that grew past its size becomes two of about half.
        let pieces = sorted.num_rows().div_ceil(file_rows.max(1));
        let per = sorted.num_rows().div_ceil(pieces);
        let mut offset = 0;
        while offset < sorted.num_rows() {
            let len = per.min(sorted.num_rows() - offset);
            w.write(sorted.slice(offset, len))
                .await
                .map_err(|e| DeltaError::Delta { table: rel.to_string(), source: e })?;
            let adds = w.flush().await.map_err(|e| DeltaError::Delta { table: rel.to_string(), source: e })?;
            stats.files_written += adds.len();
            actions.extend(adds.into_iter().map(Action::Add));
            offset += len;
        }
        stats.rows_written += sorted.num_rows() as u64;
    }
    let op = DeltaOperation::Update { predicate: Some(format!("{key} in the {} changed keys", replaced.len())) };
    let (version, _) = crate::delta::commit(&table, rel, actions, metadata, op).await?;
    Ok((version, stats))
}

/// `b` with `schema`'s columns and field types, by name (a file read back may carry other
/// metadata; a batch built elsewhere other nullability).
pub fn conform(schema: &SchemaRef, b: RecordBatch, rel: &str) -> Result<RecordBatch, DeltaError> {
    let cols: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| {
            let c =
                b.column_by_name(f.name()).ok_or_else(|| generic(rel, format!("a file has no column {}", f.name())))?;
            if c.data_type() == f.data_type() {
                Ok(c.clone())
            } else {
                cast(c, f.data_type()).map_err(|e| generic(rel, e))
            }
        })
        .collect::<Result<_, _>>()?;
    RecordBatch::try_new(schema.clone(), cols).map_err(|e| generic(rel, e))
}
