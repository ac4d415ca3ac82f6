//! The backfill: one consistent instant, N parallel workers, durable chunk manifests, one
//! Delta commit per table.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_schema::SchemaRef;
use deltalake::kernel::Add;
use deltalake::writer::{DeltaWriter, RecordBatchWriter, WriteMode};
use indexmap::IndexMap;
use serde_json::{Value, json};
use tokio_postgres::Client;
use weir_lake::Lake;
use weir_postgres::{CopyDecoder, PgColumn, PgError, RawConnection, arrow_schema, connect};

use crate::IngestError;
use crate::metrics::{Metrics, TableCounters};
use crate::partition;
use crate::plan::{self, Chunk};
use crate::sources::SourceTable;
use crate::state::{ChunkManifest, RunState, StateStore};

/// Where CDC will start: a logical replication slot created (when missing) before the
/// snapshot, whose consistent point is recorded; or, without a slot, the WAL position read
/// just before the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotMode {
    Slot(String),
    NoSlot,
}

/// The default slot for a lake: `weir_` and 12 hex digits of a hash of the lake URL.
pub fn default_slot_name(lake_url: &str) -> String {
    // FNV-1a: stable across releases and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in lake_url.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("weir_{:012x}", h >> 16)
}

#[derive(Debug, Clone)]
pub struct BackfillOptions {
    /// Parallel COPY workers (connections).
    pub jobs: usize,
    /// Target rows per chunk; `None`: [`plan::auto_chunk_rows`] of the table's size.
    pub chunk_rows: Option<u64>,
    /// Rebuild tables that are already landed (as a new table version).
    pub force: bool,
    /// Parquet bytes buffered before a file is written.
    pub target_file_bytes: usize,
    /// Rows per decoded Arrow batch.
    pub batch_rows: usize,
    pub slot: SlotMode,
}

impl Default for BackfillOptions {
    fn default() -> Self {
        Self {
            jobs: 2,
            chunk_rows: None,
            force: false,
            target_file_bytes: 128 << 20,
            batch_rows: 65_536,
            slot: SlotMode::NoSlot,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new table version was committed.
    Committed { version: i64 },
    /// Already landed by an earlier run; nothing committed.
    UpToDate { version: i64 },
}

#[derive(Debug, Clone)]
pub struct TableReport {
    pub table: String,
    pub outcome: Outcome,
    pub rows: u64,
    pub bytes: u64,
    pub files: u64,
    pub seconds: f64,
    /// Chunks taken over from an interrupted run.
    pub resumed_chunks: usize,
    pub chunks: usize,
    pub snapshot_lsn: String,
}

struct Work {
    source: SourceTable,
    columns: Vec<PgColumn>,
    schema: SchemaRef,
    run: RunState,
    /// Chunks an interrupted run had landed when this one took it over.
    resumed: usize,
    counters: Arc<TableCounters>,
    first_start: Mutex<Option<Instant>>,
    last_end: Mutex<Option<Instant>>,
}

/// Lands `tables` under `<lake>/bronze/<table>`. See the crate docs for the guarantees.
pub async fn backfill(
    pg_url: &str,
    lake: &Lake,
    tables: &[SourceTable],
    opts: &BackfillOptions,
    metrics: Arc<Metrics>,
) -> Result<Vec<TableReport>, IngestError> {
    let lake_url = lake.url().to_string();
    let coord = connect(pg_url).await?;
    let state = StateStore::new(lake.clone());

    // One backfill per table and lake at a time: a session advisory lock, released when this
    // process's connection ends, however it ends.
    for t in tables {
        let key = format!("weir.backfill|{lake_url}|{}", t.name);
        let got: bool = coord
            .query_one("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", &[&key])
            .await
            .map_err(PgError::query("taking the backfill lock"))?
            .get(0);
        if !got {
            return Err(IngestError::Busy { table: t.name.clone(), lake: lake_url.clone() });
        }
    }

    // A lake holds one source's tables (see state::SourceIdentity).
    let source = crate::state::SourceIdentity::of(&coord).await?;
    state.check_source(&source, false).await?;

    // Every table's schema first: an unsupported type stops the run before anything is written.
    let mut columns = Vec::new();
    for t in tables {
        let cols = plan::discover_columns(&coord, &t.name).await?;
        for k in t.key.iter().chain(t.chunk.iter()) {
            if !cols.iter().any(|c| &c.name == k) {
                return Err(IngestError::Config {
                    message: format!("table {}: column {k} (from tables/sources.toml) does not exist", t.name),
                });
            }
        }
        let schema = partition::table_schema(t, arrow_schema(&cols))?;
        columns.push((cols, schema));
    }

    // What each table needs: nothing (landed), a resume, or a new run.
    let mut reports = Vec::new();
    let mut todo: Vec<(usize, Option<RunState>)> = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        let table = weir_lake::open_table(lake, &t.bronze_path()).await?;
        let mut info = weir_lake::last_commit_info(&table, &t.bronze_path()).await?;
        let mut run = state.read_run(&t.name).await?;
        let landed_run =
            info.as_ref().and_then(|i| i.get("weir.backfill.run_id")).and_then(Value::as_str).map(str::to_string);
        if !opts.force
            && let Some(version) = table.version()
        {
            let mut landed = run.as_ref().is_none_or(|r| Some(&r.run_id) == landed_run.as_ref());
            if let Some(r) = run.as_ref().filter(|_| !landed) {
                // Commits since the run's own (CDC's) hide it from the last commit: a run
                // that committed is landed, and resuming it would put its snapshot back over
                // every change applied since. (A run's state is removed once it commits; a
                // lake whose runs kept it, or a crash in between, is answered by the log.)
                let found =
                    weir_lake::find_commit_info(&table, &t.bronze_path(), "weir.backfill.run_id", &r.run_id).await?;
                if found.is_some() {
                    state.clear(&t.name).await?;
                    (landed, info, run) = (true, found, None);
                }
            }
            if landed {
                let get = |k: &str| info.as_ref().and_then(|i| i.get(k)).and_then(Value::as_u64).unwrap_or(0);
                reports.push(TableReport {
                    table: t.name.clone(),
                    outcome: Outcome::UpToDate { version: version as i64 },
                    rows: get("weir.rows"),
                    bytes: get("weir.bytes"),
                    files: get("weir.files"),
                    seconds: 0.0,
                    resumed_chunks: 0,
                    chunks: 0,
                    snapshot_lsn: info
                        .as_ref()
                        .and_then(|i| i.get("weir.snapshot_lsn"))
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                });
                continue;
            }
        }
        let resume = if opts.force { None } else { run };
        todo.push((i, resume));
    }
    if todo.is_empty() {
        return Ok(reports);
    }

    // Something lands from here on: the lake records its source, unless it already does.
    state.check_source(&source, true).await?;

    // The consistent instant.
    let landing: Vec<SourceTable> = todo.iter().map(|(i, _)| tables[*i].clone()).collect();
    let lsn = start_lsn(&coord, &opts.slot, &landing).await?;
    coord
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .map_err(PgError::query("starting the snapshot transaction"))?;
    let snapshot: String = coord
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .map_err(PgError::query("exporting the snapshot"))?
        .get(0);
    let names: Vec<String> = todo.iter().map(|(i, _)| format!("\"{}\"", tables[*i].name)).collect();
    coord
        .batch_execute(&format!("LOCK TABLE {} IN ACCESS SHARE MODE", names.join(", ")))
        .await
        .map_err(PgError::query("locking the source tables against DDL"))?;
    tracing::info!(%snapshot, %lsn, "snapshot exported");

    let mut works = Vec::new();
    let mut queue = VecDeque::new();
    for (i, resume) in todo {
        let t = &tables[i];
        let (cols, schema) = columns[i].clone();
        let counters = metrics.table(&t.name);
        let (run, done) = match resume {
            Some(run) => {
                let done = state.manifests(&t.name, &run.run_id).await?;
                (run, done)
            }
            None => {
                state.clear(&t.name).await?;
                let (chunks, expected_rows) = plan::plan_chunks(&coord, t, &cols, opts.chunk_rows, opts.jobs).await?;
                let run = RunState {
                    run_id: uuid::Uuid::new_v4().to_string(),
                    table: t.name.clone(),
                    snapshot_lsn: lsn.clone(),
                    started_at: chrono::Utc::now().to_rfc3339(),
                    chunk_column: t.chunk.clone(),
                    chunks,
                    expected_rows,
                };
                state.write_run(&run).await?;
                (run, Vec::new())
            }
        };
        counters.expected_rows.store(run.expected_rows, Ordering::Relaxed);
        counters.chunks_total.store(run.chunks.len() as u64, Ordering::Relaxed);
        for m in &done {
            counters.rows.fetch_add(m.rows, Ordering::Relaxed);
            counters.source_bytes.fetch_add(m.source_bytes, Ordering::Relaxed);
            counters.written_bytes.fetch_add(m.adds.iter().map(|a| a.size as u64).sum(), Ordering::Relaxed);
            counters.files.fetch_add(m.adds.len() as u64, Ordering::Relaxed);
            counters.chunks_done.fetch_add(1, Ordering::Relaxed);
        }
        let w = works.len();
        for c in &run.chunks {
            if !done.iter().any(|m| m.chunk == c.id) {
                queue.push_back((w, c.clone()));
            }
        }
        if !done.is_empty() {
            tracing::info!(table = %t.name, resumed = done.len(), remaining = run.chunks.len() - done.len(), "resuming an interrupted backfill");
        }
        works.push(Arc::new(Work {
            source: t.clone(),
            columns: cols,
            schema,
            run,
            resumed: done.len(),
            counters,
            first_start: Mutex::new(None),
            last_end: Mutex::new(None),
        }));
    }

    // Workers: each imports the snapshot once, then takes chunks until the queue is empty.
    let queue = Arc::new(Mutex::new(queue));
    let abort = Arc::new(AtomicBool::new(false));
    let n_workers = opts.jobs.max(1).min(queue.lock().unwrap_or_else(|p| p.into_inner()).len().max(1));
    // Each worker is an OS thread with its own single-threaded runtime, which also drives its
    // PostgreSQL connection: a row's bytes are read, decoded and encoded on one thread, with
    // no task hand-off between threads per message. The lake's shared store stays on this
    // runtime (`main`), which writes the chunk manifests.
    let main = tokio::runtime::Handle::current();
    let mut handles = Vec::new();
    for w in 0..n_workers {
        let (queue, abort, works, state, main) =
            (queue.clone(), abort.clone(), works.clone(), state.clone(), main.clone());
        let (pg_url, snapshot, lsn, lake, opts) =
            (pg_url.to_string(), snapshot.clone(), lsn.clone(), lake.clone(), opts.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("weir-copy-{w}"))
            .spawn(move || {
                let r = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| IngestError::Task(format!("starting worker {w}: {e}")))
                    .and_then(|rt| {
                        rt.block_on(worker(
                            w, &pg_url, &snapshot, &lsn, &lake, &opts, &queue, &abort, &works, &state, &main,
                        ))
                    });
                if r.is_err() {
                    abort.store(true, Ordering::Relaxed);
                }
                let _ = tx.send(r);
            })
            .map_err(|e| IngestError::Task(format!("starting worker {w}: {e}")))?;
        handles.push(rx);
    }
    let mut first_err = None;
    for h in handles {
        let r = h.await.map_err(|_| IngestError::Task("a backfill worker panicked".to_string())).and_then(|r| r);
        if let Err(e) = r
            && first_err.is_none()
        {
            first_err = Some(e);
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    coord.batch_execute("COMMIT").await.map_err(PgError::query("ending the snapshot transaction"))?;

    // One commit per table with every chunk's files and the snapshot LSN.
    for work in works {
        let t = &work.source;
        let manifests = state.manifests(&t.name, &work.run.run_id).await?;
        let missing: Vec<u32> =
            work.run.chunks.iter().map(|c| c.id).filter(|id| !manifests.iter().any(|m| m.chunk == *id)).collect();
        if !missing.is_empty() {
            return Err(IngestError::Incomplete { table: t.name.clone(), missing });
        }
        let rows: u64 = manifests.iter().map(|m| m.rows).sum();
        let adds: Vec<Add> = manifests.iter().flat_map(|m| m.adds.iter().cloned()).collect();
        let bytes: u64 = adds.iter().map(|a| a.size as u64).sum();
        let files = adds.len() as u64;
        let mut lsns: Vec<String> = manifests.iter().map(|m| m.snapshot_lsn.clone()).collect();
        lsns.sort();
        lsns.dedup();
        let metadata: HashMap<String, Value> = [
            ("weir.backfill.run_id", json!(work.run.run_id)),
            ("weir.source_table", json!(t.name)),
            ("weir.snapshot_lsn", json!(work.run.snapshot_lsn)),
            ("weir.snapshot_lsns", json!(lsns)),
            ("weir.rows", json!(rows)),
            ("weir.bytes", json!(bytes)),
            ("weir.files", json!(files)),
            ("weir.key", json!(t.key)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let table = weir_lake::open_table(lake, &t.bronze_path()).await?;
        let partition_cols: Vec<String> = t.partition_column().into_iter().collect();
        // CDC starts at the snapshot's LSN: recorded where `weir sync` keeps its position.
        let txn = weir_postgres::pgoutput::parse_lsn(&work.run.snapshot_lsn)
            .map(|l| deltalake::kernel::Transaction::new(crate::cdc::APP_ID, l as i64));
        let (version, _) = weir_lake::commit_files(
            table,
            &t.bronze_path(),
            &work.schema,
            &partition_cols,
            adds,
            metadata,
            None,
            txn,
            None,
        )
        .await?;
        // Landed: the run is done, and a later `weir backfill` must not take it for one to resume.
        state.clear(&t.name).await?;
        let seconds = match (
            *work.first_start.lock().unwrap_or_else(|p| p.into_inner()),
            *work.last_end.lock().unwrap_or_else(|p| p.into_inner()),
        ) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => 0.0,
        };
        reports.push(TableReport {
            table: t.name.clone(),
            outcome: Outcome::Committed { version },
            rows,
            bytes,
            files,
            seconds,
            resumed_chunks: work.resumed,
            chunks: work.run.chunks.len(),
            snapshot_lsn: work.run.snapshot_lsn.clone(),
        });
    }
    reports.sort_by_key(|r| tables.iter().position(|t| t.name == r.table));
    Ok(reports)
}

async fn start_lsn(coord: &Client, slot: &SlotMode, tables: &[SourceTable]) -> Result<String, IngestError> {
    match slot {
        SlotMode::NoSlot => Ok(coord
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(PgError::query("reading the WAL position"))?
            .get(0)),
        SlotMode::Slot(name) => {
            let level: String =
                coord.query_one("SHOW wal_level", &[]).await.map_err(PgError::query("SHOW wal_level"))?.get(0);
            if level != "logical" {
                return Err(IngestError::WalLevel { level });
            }
            // The publication (named like the slot) first: pgoutput decodes with the catalog
            // as of each change, so a table must be published before the LSN CDC starts at.
            crate::cdc::ensure_publication(coord, name, tables).await?;
            let exists: bool = coord
                .query_one("SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)", &[name])
                .await
                .map_err(PgError::query("looking up the replication slot"))?
                .get(0);
            if exists {
                // CDC already holds WAL from an earlier point; it re-applies by key.
                return Ok(coord
                    .query_one("SELECT pg_current_wal_lsn()::text", &[])
                    .await
                    .map_err(PgError::query("reading the WAL position"))?
                    .get(0));
            }
            Ok(coord
                .query_one("SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')", &[name])
                .await
                .map_err(PgError::query(format!("creating logical replication slot {name}")))?
                .get(0))
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    id: usize,
    pg_url: &str,
    snapshot: &str,
    lsn: &str,
    lake: &Lake,
    opts: &BackfillOptions,
    queue: &Mutex<VecDeque<(usize, Chunk)>>,
    abort: &AtomicBool,
    works: &[Arc<Work>],
    state: &StateStore,
    main: &tokio::runtime::Handle,
) -> Result<(), IngestError> {
    let mut client = RawConnection::connect(pg_url).await?;
    client
        .execute(
            &format!(
                // JIT compiles each chunk's plain range scan anew (~0.1 s a chunk at SF 10) and
                // buys nothing for it.
                "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT '{snapshot}'; SET LOCAL jit = off"
            ),
            &format!("worker {id}: importing snapshot {snapshot}"),
        )
        .await?;
    loop {
        if abort.load(Ordering::Relaxed) {
            return Ok(());
        }
        let Some((w, chunk)) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front() else { break };
        let work = &works[w];
        {
            let mut s = work.first_start.lock().unwrap_or_else(|p| p.into_inner());
            s.get_or_insert_with(Instant::now);
        }
        let manifest = copy_chunk(&mut client, lake, opts, work, &chunk, lsn, abort).await?;
        let (state, table, run_id) = (state.clone(), work.source.name.clone(), work.run.run_id.clone());
        main.spawn(async move { state.write_manifest(&table, &run_id, &manifest).await })
            .await
            .map_err(|e| IngestError::Task(e.to_string()))??;
        work.counters.chunks_done.fetch_add(1, Ordering::Relaxed);
        *work.last_end.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }
    client.execute("COMMIT", "ending a worker transaction").await?;
    Ok(())
}

async fn copy_chunk(
    client: &mut RawConnection,
    lake: &Lake,
    opts: &BackfillOptions,
    work: &Work,
    chunk: &Chunk,
    lsn: &str,
    abort: &AtomicBool,
) -> Result<ChunkManifest, IngestError> {
    let t = &work.source;
    let cols: Vec<String> = work.columns.iter().map(|c| format!("\"{}\"", c.name)).collect();
    let sql = format!(
        "COPY (SELECT {} FROM \"{}\"{}) TO STDOUT (FORMAT binary)",
        cols.join(", "),
        t.name,
        chunk.predicate(work.run.chunk_column.as_deref())
    );
    let write_err = |message: String| IngestError::Write { table: t.name.clone(), chunk: chunk.id, message };
    let props = crate::parquet_properties(&work.schema, &t.key);
    let partition_col = t.partition_column();
    let mut writer = RecordBatchWriter::try_new(
        lake.table_url(&t.bronze_path()).as_str(),
        work.schema.clone(),
        partition_col.clone().map(|c| vec![c]),
        Some(lake.storage_options().clone()),
    )
    .map_err(|e| write_err(e.to_string()))?
    .with_writer_properties(props);

    let context = format!("{} chunk {}", t.name, chunk.id);
    client.start_copy(&sql, &format!("{context}: {sql}")).await?;
    let mut decoder = CopyDecoder::new(context.clone(), work.columns.clone(), opts.batch_rows);
    let mut batches = Vec::new();
    let mut adds = Vec::new();
    let (mut rows, mut source_bytes) = (0u64, 0u64);
    let mut last_check = Instant::now();
    let copy_context = format!("{context}: COPY");
    loop {
        // Every CopyData message (a row) the socket has for now, straight into the builders.
        let mut read = 0u64;
        let more = client
            .read_copy(&copy_context, |payload| -> Result<(), IngestError> {
                read += payload.len() as u64;
                Ok(decoder.feed(payload, &mut batches)?)
            })
            .await?;
        if !more {
            decoder.finish(&mut batches)?;
        }
        source_bytes += read;
        work.counters.source_bytes.fetch_add(read, Ordering::Relaxed);
        for batch in batches.drain(..) {
            let n = batch.num_rows() as u64;
            // Split here rather than in delta-rs's `write`, which sorts a partition string per row.
            for (value, part) in partition::split(t, batch)? {
                let values: IndexMap<String, _> = partition_col.clone().zip(value).into_iter().collect();
                writer
                    .write_partition(part, &values, WriteMode::Default)
                    .await
                    .map_err(|e| write_err(e.to_string()))?;
            }
            rows += n;
            work.counters.rows.fetch_add(n, Ordering::Relaxed);
            if writer.buffer_len() >= opts.target_file_bytes {
                let written = writer.flush().await.map_err(|e| write_err(e.to_string()))?;
                record_files(&work.counters, &written);
                adds.extend(written);
            }
        }
        if last_check.elapsed() > Duration::from_millis(500) {
            last_check = Instant::now();
            if abort.load(Ordering::Relaxed) {
                return Err(write_err("stopped because another worker failed".to_string()));
            }
        }
        if !more {
            break;
        }
    }
    let written = writer.flush().await.map_err(|e| write_err(e.to_string()))?;
    record_files(&work.counters, &written);
    adds.extend(written);
    drop_lossy_stats(&mut adds, &work.columns);
    Ok(ChunkManifest { chunk: chunk.id, rows, source_bytes, snapshot_lsn: lsn.to_string(), adds })
}

/// delta-rs 0.32 writes decimal min/max statistics through f64, which is exact only up to 15
/// significant digits; wider bounds come back rounded (and may not even parse: 1e+28 for a
/// decimal(38,10) maximum). A rounded bound could make a reader skip a file that holds a
/// match, so for decimals wider than 15 digits the min/max are dropped (nullCount is kept).
fn drop_lossy_stats(adds: &mut [Add], columns: &[PgColumn]) {
    let lossy: Vec<&str> = columns
        .iter()
        .filter(|c| matches!(c.ty, weir_postgres::PgType::Numeric { precision, .. } if precision > 15))
        .map(|c| c.name.as_str())
        .collect();
    if lossy.is_empty() {
        return;
    }
    weir_lake::retain_stats(adds, &["minValues", "maxValues"], |c| !lossy.contains(&c));
}

fn record_files(c: &TableCounters, adds: &[Add]) {
    c.files.fetch_add(adds.len() as u64, Ordering::Relaxed);
    c.written_bytes.fetch_add(adds.iter().map(|a| a.size as u64).sum(), Ordering::Relaxed);
}
