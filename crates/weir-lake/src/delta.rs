//! Delta tables in the lake: open, inspect the last commit, commit a set of files at once.

use std::collections::HashMap;

use arrow_schema::Schema as ArrowSchema;
use deltalake::DeltaTable;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add, StructType, new_metadata};
use deltalake::protocol::{DeltaOperation, SaveMode};
use futures::TryStreamExt;
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

fn delta_err(table: &str) -> impl FnOnce(deltalake::DeltaTableError) -> DeltaError + '_ {
    move |source| DeltaError::Delta { table: table.to_string(), source }
}

/// Opens (or prepares to create) the Delta table at `rel` under the lake.
pub async fn open_table(lake: &Lake, rel: &str) -> Result<DeltaTable, DeltaError> {
    lake.prepare_table_dir(rel)?;
    let url = lake.table_url(rel);
    DeltaTable::try_from_url_with_storage_options(url, lake.storage_options().clone()).await.map_err(delta_err(rel))
}

/// The application metadata (commitInfo) of the latest commit, if the table exists.
pub async fn last_commit_info(table: &DeltaTable, rel: &str) -> Result<Option<HashMap<String, Value>>, DeltaError> {
    if table.version().is_none() {
        return Ok(None);
    }
    let mut history = table.history(Some(1)).await.map_err(delta_err(rel))?;
    Ok(history.next().map(|ci| ci.info))
}

/// Commits `adds` as the table's content in one commit: creates the table (schema and
/// partitioning) when it does not exist, otherwise replaces every current file (overwrite),
/// or with `partition` (`column = value`) only that partition's files. Returns the new
/// version. A concurrent writer that commits first makes this fail, never corrupt: the
/// commit file is written with put-if-absent.
pub async fn commit_files(
    table: DeltaTable,
    rel: &str,
    schema: &ArrowSchema,
    partition_columns: &[String],
    adds: Vec<Add>,
    metadata: HashMap<String, Value>,
    partition: Option<(&str, &str)>,
) -> Result<i64, DeltaError> {
    let props = CommitProperties::default().with_metadata(metadata.clone());
    if table.version().is_none() {
        let kernel: StructType = schema.try_into_kernel().map_err(|e| DeltaError::Delta {
            table: rel.to_string(),
            source: deltalake::DeltaTableError::Generic(e.to_string()),
        })?;
        let created = table
            .create()
            .with_columns(kernel.fields().cloned())
            .with_partition_columns(partition_columns.to_vec())
            .with_actions(adds.into_iter().map(Action::Add))
            .with_commit_properties(props)
            .await
            .map_err(|source| classify(rel, source))?;
        return Ok(created.version().unwrap_or(0) as i64);
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
    if *snapshot.schema() != kernel || snapshot.metadata().partition_columns() != partition_columns {
        let meta = new_metadata(&kernel, partition_columns, snapshot.metadata().configuration().clone())
            .map_err(|e| delta_err(rel)(e.into()))?;
        actions.push(Action::Metadata(meta));
    }
    actions.extend(adds.into_iter().map(Action::Add));
    let op = DeltaOperation::Write {
        mode: SaveMode::Overwrite,
        partition_by: Some(partition_columns.to_vec()),
        predicate: partition.map(|(c, v)| format!("{c} = {v}")),
    };
    let done = CommitBuilder::default()
        .with_actions(actions)
        .with_app_metadata(metadata)
        .build(Some(snapshot), table.log_store(), op)
        .await
        .map_err(|source| classify(rel, source))?;
    Ok(done.version() as i64)
}

fn classify(rel: &str, source: deltalake::DeltaTableError) -> DeltaError {
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
