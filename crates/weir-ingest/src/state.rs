//! Durable backfill state in the lake, next to the tables: the run's plan and one manifest
//! per finished chunk (its Parquet files), so that a killed run resumes without redoing them.

use deltalake::kernel::Add;
use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use weir_lake::Lake;

use crate::IngestError;
use crate::plan::Chunk;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub run_id: String,
    pub table: String,
    /// Where CDC starts for this table: the LSN of the first snapshot of this run.
    pub snapshot_lsn: String,
    pub started_at: String,
    pub chunk_column: Option<String>,
    pub chunks: Vec<Chunk>,
    pub expected_rows: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkManifest {
    pub chunk: u32,
    pub rows: u64,
    pub source_bytes: u64,
    /// The snapshot LSN this chunk was read at.
    pub snapshot_lsn: String,
    pub adds: Vec<Add>,
}

#[derive(Debug, Clone)]
pub struct StateStore {
    lake: Lake,
}

fn state_err(what: String) -> impl FnOnce(object_store::Error) -> IngestError {
    move |e| IngestError::State { message: format!("{what}: {e}") }
}

impl StateStore {
    pub fn new(lake: Lake) -> Self {
        Self { lake }
    }

    fn run_path(&self, table: &str) -> object_store::path::Path {
        self.lake.path(&format!("_weir/backfill/{table}/run.json"))
    }

    fn chunk_dir(&self, table: &str, run_id: &str) -> object_store::path::Path {
        self.lake.path(&format!("_weir/backfill/{table}/{run_id}"))
    }

    pub async fn read_run(&self, table: &str) -> Result<Option<RunState>, IngestError> {
        let path = self.run_path(table);
        match self.lake.store().get(&path).await {
            Ok(r) => {
                let bytes = r.bytes().await.map_err(state_err(format!("reading {path}")))?;
                let run = serde_json::from_slice(&bytes)
                    .map_err(|e| IngestError::State { message: format!("{path} is not a backfill run state: {e}") })?;
                Ok(Some(run))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(state_err(format!("reading {path}"))(e)),
        }
    }

    pub async fn write_run(&self, run: &RunState) -> Result<(), IngestError> {
        let path = self.run_path(&run.table);
        let body = serde_json::to_vec_pretty(run).expect("serializable");
        self.lake.store().put(&path, PutPayload::from(body)).await.map_err(state_err(format!("writing {path}")))?;
        Ok(())
    }

    pub async fn write_manifest(&self, table: &str, run_id: &str, m: &ChunkManifest) -> Result<(), IngestError> {
        let path = self.chunk_dir(table, run_id).clone().join(format!("chunk-{:05}.json", m.chunk).as_str());
        let body = serde_json::to_vec(m).expect("serializable");
        self.lake.store().put(&path, PutPayload::from(body)).await.map_err(state_err(format!("writing {path}")))?;
        Ok(())
    }

    pub async fn manifests(&self, table: &str, run_id: &str) -> Result<Vec<ChunkManifest>, IngestError> {
        let dir = self.chunk_dir(table, run_id);
        let store = self.lake.store();
        let metas: Vec<_> = store.list(Some(&dir)).try_collect().await.map_err(state_err(format!("listing {dir}")))?;
        let mut out = Vec::new();
        for m in metas {
            if !m.location.as_ref().ends_with(".json") {
                continue;
            }
            let bytes = store
                .get(&m.location)
                .await
                .map_err(state_err(format!("reading {}", m.location)))?
                .bytes()
                .await
                .map_err(state_err(format!("reading {}", m.location)))?;
            let manifest: ChunkManifest = serde_json::from_slice(&bytes)
                .map_err(|e| IngestError::State { message: format!("{} is not a chunk manifest: {e}", m.location) })?;
            out.push(manifest);
        }
        out.sort_by_key(|m| m.chunk);
        Ok(out)
    }

    /// Removes the table's backfill state (a new run starts from scratch).
    pub async fn clear(&self, table: &str) -> Result<(), IngestError> {
        let store = self.lake.store();
        let dir = self.lake.path(&format!("_weir/backfill/{table}"));
        let metas: Vec<_> = store.list(Some(&dir)).try_collect().await.map_err(state_err(format!("listing {dir}")))?;
        for m in metas {
            store.delete(&m.location).await.map_err(state_err(format!("deleting {}", m.location)))?;
        }
        Ok(())
    }
}
