//! Reading the rows of a few keys from a Delta table without decoding the rest of it.
//!
//! An incremental derive recomputes the keys a change touched (a CDC day: a sixth of the
//! listings) from its keyed sources restricted to them. As a DataFusion semi join, that decoded
//! every column of every row of each source and then dropped most of them. Here each file whose
//! key range holds a wanted key is read with its deletion vector as a row selection and a row
//! filter on the key column: Parquet decodes the key column, then the other columns of the
//! matching rows only. Files are read side by side, each in a task of its own.

use arrow::array::{AsArray, BooleanArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type, SchemaRef};
use deltalake::DeltaTable;
use deltalake::kernel::Add;
use deltalake::parquet::arrow::ProjectionMask;
use deltalake::parquet::arrow::arrow_reader::{ArrowPredicateFn, RowFilter};
use deltalake::parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStreamBuilder};
use futures::{StreamExt, TryStreamExt};
use roaring::RoaringTreemap;

use crate::delta::{DeltaError, delta_err, generic};
use crate::dv::{
    CONCURRENT_FILES, KeyScope, active_adds, holds_one_in, key_range, live_selection, read_deletion_vector, table_rows,
};
use crate::store::Lake;

/// The live rows of `table` (stored at `rel` in `lake`, as `table` holds it: its snapshot's
/// files and deletion vectors) whose integer column `key` holds one of `keys`, in the table's
/// schema (`arrow_schema()` of its snapshot). Files whose statistics rule every key out are
/// not opened.
pub async fn rows_with_keys(
    lake: &Lake,
    table: &DeltaTable,
    rel: &str,
    key: &str,
    keys: &KeyScope,
) -> Result<Vec<RecordBatch>, DeltaError> {
    let snapshot = table.snapshot().map_err(delta_err(rel))?;
    let schema: SchemaRef = snapshot.snapshot().arrow_schema();
    let field = schema.field_with_name(key).map_err(|e| generic(rel, e))?;
    if !field.data_type().is_integer() {
        return Err(generic(
            rel,
            format!("reading rows by key needs an integer key column, {key} is {}", field.data_type()),
        ));
    }
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let files: Vec<Add> = active_adds(table, rel)
        .await?
        .into_iter()
        .filter(|add| match add.partition_values.get(key) {
            // A partition key: the file holds one value of it.
            Some(v) => v.as_deref().and_then(|v| v.parse::<i64>().ok()).is_some_and(|k| keys.contains(k)),
            None => key_range(add, key).is_none_or(|(lo, hi)| holds_one_in(&keys.sorted, lo, hi)),
        })
        .collect();
    let batches: Vec<Vec<RecordBatch>> = futures::stream::iter(files)
        .map(|add| {
            let (lake, owned, schema, key, keys) =
                (lake.clone(), rel.to_string(), schema.clone(), key.to_string(), keys.clone());
            // A task per file: decoding is most of the read, and the runtime's threads share it.
            let task = tokio::spawn(async move { read_file(&lake, &owned, &schema, &key, &keys, add).await });
            async move { task.await.map_err(|e| generic(rel, format!("a file read failed: {e}")))? }
        })
        .buffer_unordered(CONCURRENT_FILES)
        .try_collect()
        .await?;
    Ok(batches.into_iter().flatten().collect())
}

/// The live rows of one file whose `key` is one of `keys`, in `schema`.
async fn read_file(
    lake: &Lake,
    rel: &str,
    schema: &SchemaRef,
    key: &str,
    keys: &KeyScope,
    add: Add,
) -> Result<Vec<RecordBatch>, DeltaError> {
    let at = |e: &dyn std::fmt::Display| generic(rel, format!("{}: {e}", add.path));
    let deleted = match &add.deletion_vector {
        Some(dv) => read_deletion_vector(lake, rel, dv).await?,
        None => RoaringTreemap::new(),
    };
    let reader = ParquetObjectReader::new(lake.store(), lake.path(&format!("{rel}/{}", add.path)))
        .with_file_size(add.size as u64);
    let mut builder = ParquetRecordBatchStreamBuilder::new(reader).await.map_err(|e| at(&e))?;
    let rows = builder.metadata().file_metadata().num_rows() as u64;
    if !deleted.is_empty() {
        builder = builder.with_row_selection(live_selection(&deleted, rows));
    }
    if !add.partition_values.contains_key(key) {
        if builder.schema().column_with_name(key).is_none() {
            // A file written before the column existed: its rows' key is NULL.
            return Ok(Vec::new());
        }
        let mask = ProjectionMask::columns(builder.parquet_schema(), [key]);
        let keys = keys.clone();
        let wanted = ArrowPredicateFn::new(mask, move |b: RecordBatch| {
            let ints = cast(b.column(0), &DataType::Int64)?;
            Ok(ints
                .as_primitive::<Int64Type>()
                .iter()
                .map(|k| Some(k.is_some_and(|k| keys.contains(k))))
                .collect::<BooleanArray>())
        });
        builder = builder.with_row_filter(RowFilter::new(vec![Box::new(wanted)]));
    }
    let batches: Vec<RecordBatch> =
        builder.with_batch_size(64 * 1024).build().map_err(|e| at(&e))?.try_collect().await.map_err(|e| at(&e))?;
    batches.iter().filter(|b| b.num_rows() > 0).map(|b| table_rows(b, schema, &add, rel)).collect()
}
