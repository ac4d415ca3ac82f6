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
        self.read_json(&self.run_path(table), "a backfill run state").await
    }

    /// The JSON document at `path` (`what` it should be), None when there is none.
    async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &object_store::path::Path,
        what: &str,
    ) -> Result<Option<T>, IngestError> {
        match self.lake.store().get(path).await {
            Ok(r) => {
                let bytes = r.bytes().await.map_err(state_err(format!("reading {path}")))?;
                let value = serde_json::from_slice(&bytes)
                    .map_err(|e| IngestError::State { message: format!("{path} is not {what}: {e}") })?;
                Ok(Some(value))
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

/// The PostgreSQL database a lake's bronze tables come from: its cluster's system identifier
/// (`pg_control_system()`, unique per `initdb`) and the database's name. A lake holds one
/// source: the first backfill records it in `_weir/source.json`, and a backfill or a sync
/// from another source is refused, before anything is written, instead of mixing its rows
/// and changes into the other's tables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceIdentity {
    pub system_identifier: String,
    pub database: String,
}

impl std::fmt::Display for SourceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "database {} of the PostgreSQL cluster with system identifier {}",
            self.database, self.system_identifier
        )
    }
}

impl SourceIdentity {
    /// The identity of the database `client` is connected to.
    pub async fn of(client: &tokio_postgres::Client) -> Result<Self, IngestError> {
        let row = client
            .query_one("SELECT system_identifier::text, current_database()::text FROM pg_control_system()", &[])
            .await
            .map_err(weir_postgres::PgError::query("reading the source's system identifier"))?;
        Ok(SourceIdentity { system_identifier: row.get(0), database: row.get(1) })
    }
}

impl StateStore {
    fn source_path(&self) -> object_store::path::Path {
        self.lake.path("_weir/source.json")
    }

    /// The source the lake records, if any.
    pub async fn recorded_source(&self) -> Result<Option<SourceIdentity>, IngestError> {
        self.read_json(&self.source_path(), "a source identity").await
    }

    /// Refuses `source` when the lake records another; records it when the lake records
    /// none yet (`record`: a backfill), put-if-absent, so two first backfills from different
    /// sources cannot both win.
    pub async fn check_source(&self, source: &SourceIdentity, record: bool) -> Result<(), IngestError> {
        let recorded = match self.recorded_source().await? {
            Some(r) => r,
            None if !record => return Ok(()),
            None => {
                let path = self.source_path();
                let body = PutPayload::from(serde_json::to_vec_pretty(source).expect("serializable"));
                let opts = object_store::PutOptions { mode: object_store::PutMode::Create, ..Default::default() };
                match self.lake.store().put_opts(&path, body, opts).await {
                    Ok(_) => return Ok(()),
                    Err(object_store::Error::AlreadyExists { .. }) => {
                        self.recorded_source().await?.ok_or_else(|| IngestError::State {
                            message: format!("{path} was written and is gone again"),
                        })?
                    }
                    Err(e) => return Err(state_err(format!("writing {path}"))(e)),
                }
            }
        };
        if &recorded == source {
            return Ok(());
        }
        Err(IngestError::Config {
            message: format!(
                "{} holds the tables of {recorded}, not of {source}: use a lake of its own for this source (the lake records its source in _weir/source.json)",
                self.lake.url()
            ),
        })
    }
}
