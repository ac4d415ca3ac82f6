//! `weir sync`: logical-replication CDC from PostgreSQL into the bronze Delta tables,
//! exactly once.
//!
//! The slot the backfill created is read with `pg_logical_slot_peek_binary_changes` (pgoutput,
//! values in binary form) a batch of whole transactions at a time. Each batch is folded per
//! table and key (the last change of a key wins; a truncate drops what came before it) and
//! applied with one Delta MERGE per table whose commit carries an application transaction
//! (`txn`, app id [`APP_ID`]) holding the end LSN of the batch's last transaction. Only when
//! every table's commit is durable is the slot advanced (`pg_replication_slot_advance`). A
//! crash anywhere is recovered by reading from the slot again: each table skips the
//! transactions that committed before the LSN its own Delta log records, so nothing is lost
//! and nothing is applied twice, and the slot never passes what the lake holds.
//!
//! A transaction of more changes than a batch is applied in parts as its rows stream in: each
//! part's commits record the transaction's commit LSN under [`APP_ID`] and, under
//! [`PARTIAL_APP_ID`], how many of its changes to the table are in; a replay skips those
//! (pgoutput sends a transaction's changes in the same order every time). The slot moves only
//! past whole transactions.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow_array::builder::BooleanBuilder;
use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use deltalake::DeltaTable;
use deltalake::kernel::Transaction;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::CommitProperties;
use futures::TryStreamExt;
use rustc_hash::FxHashMap;
use serde_json::{Value as Json, json};
use smallvec::SmallVec;
use tokio_postgres::Client;
use weir_lake::Lake;
use weir_postgres::pgoutput::{self, Message, Relation, Tuple, Value};
use weir_postgres::{CopyDecoder, PgColumn, PgError, PgType, arrow_schema, connect};

use crate::IngestError;
use crate::partition;
use crate::sources::SourceTable;

/// The Delta application-transaction id under which CDC records the applied LSN.
pub const APP_ID: &str = "weir.cdc";

/// The application-transaction id under which a table records, when [`APP_ID`] holds the
/// commit LSN of a transaction larger than a batch, how many of that transaction's changes to
/// the table it holds (0: none, or [`APP_ID`] holds an end LSN).
pub const PARTIAL_APP_ID: &str = "weir.cdc.partial";

use weir_lake::{KEEP_PREFIX as KEEP, OP_COLUMN as OP};

/// An insert-only batch is appended as new files while the partitions it writes to hold fewer
/// small files than this ([`weir_lake::small_files_in_partitions_of`]); at this many it is
/// merged instead, which folds them into its new files. A continuous sync of an append-only
/// log (a file or so per batch) so keeps at most this many small files in a partition.
pub const FOLD_APPENDED_FILES: usize = 8;

#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// The logical slot (and publication) the backfill created.
    pub slot: String,
    /// Keep applying new transactions until stopped; otherwise stop at the WAL position
    /// read at the start.
    pub follow: bool,
    /// Changes read per batch. A batch finishes the transactions it reads; one transaction
    /// of more changes than this is applied in parts of this many (its commit LSN and how many
    /// of its changes each table holds are recorded), so memory stays bounded.
    pub batch_changes: i32,
    /// How long `follow` waits when nothing is new.
    pub poll: Duration,
    /// PostgreSQL's `logical_decoding_work_mem` for the sync's own session (e.g. "256MB"):
    /// how much of a transaction the server keeps in memory while decoding it before it
    /// spills the rest to disk. None: the server's setting (64MB unless configured).
    pub decoding_work_mem: Option<String>,
}

/// The `logical_decoding_work_mem` a sync decodes with unless told otherwise. A transaction
/// that does not fit is spilled to disk and read back, which doubled PostgreSQL's decode of a
/// generated day at SF 30 (400k changes: 1.14 s at the server's 64MB, 0.56 s with room).
/// The memory is the source server's, for the sync's session, while it decodes.
pub const DEFAULT_DECODING_WORK_MEM: &str = "256MB";

impl SyncOptions {
    pub fn new(slot: impl Into<String>) -> Self {
        Self {
            slot: slot.into(),
            follow: false,
            batch_changes: 200_000,
            poll: Duration::from_millis(250),
            decoding_work_mem: Some(DEFAULT_DECODING_WORK_MEM.to_string()),
        }
    }
}

/// Sets `logical_decoding_work_mem` for `client`'s session (see
/// [`SyncOptions::decoding_work_mem`]); an invalid size is an error naming it.
pub async fn set_decoding_work_mem(client: &Client, size: &str) -> Result<(), IngestError> {
    client
        .query_one("SELECT set_config('logical_decoding_work_mem', $1, false)", &[&size])
        .await
        .map_err(PgError::query(format!("setting logical_decoding_work_mem to {size:?}")))?;
    Ok(())
}

/// What one table received in a batch (or in a whole run).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableChanges {
    pub table: String,
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    pub truncates: u64,
    /// Changes of transactions the table's Delta log already holds (a replay after a crash).
    pub skipped: u64,
    /// Rows the MERGE inserted, updated and deleted in the lake.
    pub rows_inserted: u64,
    pub rows_updated: u64,
    pub rows_deleted: u64,
    /// The table version committed, if any.
    pub version: Option<i64>,
}

impl TableChanges {
    fn add(&mut self, o: &TableChanges) {
        self.inserts += o.inserts;
        self.updates += o.updates;
        self.deletes += o.deletes;
        self.truncates += o.truncates;
        self.skipped += o.skipped;
        self.rows_inserted += o.rows_inserted;
        self.rows_updated += o.rows_updated;
        self.rows_deleted += o.rows_deleted;
        if o.version.is_some() {
            self.version = o.version;
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct BatchReport {
    /// The slot position the batch started from and the end of its last transaction.
    pub from_lsn: String,
    pub to_lsn: String,
    pub transactions: u64,
    pub changes: u64,
    /// Commit time of the batch's last transaction (µs since the Unix epoch).
    pub last_commit_micros: Option<i64>,
    /// The batch stopped inside a transaction larger than a batch (`to_lsn` is its commit
    /// LSN): its first changes are applied, the next batch goes on with the rest.
    pub inside: bool,
    pub seconds: f64,
    pub tables: Vec<TableChanges>,
}

#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    pub batches: u64,
    pub transactions: u64,
    pub changes: u64,
    /// Where the slot stands at the end.
    pub lsn: String,
    /// Stopped (`stop`) between two parts of a transaction larger than a batch: the tables
    /// hold its first changes, the next sync applies the rest.
    pub inside: bool,
    pub tables: Vec<TableChanges>,
}

/// Reads the slot and applies it to the bronze tables until caught up (or, with `follow`,
/// until `stop` is set). `on_batch` sees every applied batch.
pub async fn sync(
    pg_url: &str,
    lake: &Lake,
    tables: &[SourceTable],
    opts: &SyncOptions,
    stop: &AtomicBool,
    mut on_batch: impl FnMut(&BatchReport),
) -> Result<SyncReport, IngestError> {
    let client = connect(pg_url).await?;
    let source = crate::state::SourceIdentity::of(&client).await?;
    crate::state::StateStore::new(lake.clone()).check_source(&source, false).await?;
    let slot = &opts.slot;
    check_slot(&client, slot).await?;
    check_publication(&client, slot, tables).await?;
    if let Some(size) = &opts.decoding_work_mem {
        set_decoding_work_mem(&client, size).await?;
    }

    let lock = format!("weir.sync|{}", lake.url());
    let got: bool = client
        .query_one("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", &[&lock])
        .await
        .map_err(PgError::query("taking the sync lock"))?
        .get(0);
    if !got {
        return Err(IngestError::Cdc {
            message: format!("another weir sync is applying slot {slot} to {} right now", lake.url()),
        });
    }

    let mut states = Vec::new();
    for t in tables {
        states.push(TableState::open(lake, t).await?);
    }
    let mut report = SyncReport {
        tables: tables.iter().map(|t| TableChanges { table: t.name.clone(), ..Default::default() }).collect(),
        ..Default::default()
    };
    let mut position = slot_position(&client, slot).await?;
    let started_at = position;
    let pages = WalPages::read(&client).await?;
    let mut upto = current_lsn(&client).await?;
    'batches: loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let started = Instant::now();
        // Read before the peek: decoding reads flushed WAL only, so "nothing came back" means
        // "nothing committed before `upto`" only if `upto` was already flushed when it ran.
        let flushed = flush_lsn(&client).await?;
        if flushed < pages.record_end(upto) {
            // Commits before `upto` that are not flushed yet (synchronous_commit = off) would
            // be left for a second batch: wait the moment it takes the WAL writer.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        // Nothing written since the slot's position: no transaction to read (a peek would
        // still decode the WAL from the slot's restart point).
        let mut stream = if upto <= position {
            None
        } else {
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
                [slot, &pgoutput::format_lsn(upto), &opts.batch_changes, slot];
            Some(Box::pin(
                client
                    .query_raw(
                        "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, $3,
                             'proto_version', '1', 'publication_names', $4, 'binary', 'true')",
                        params,
                    )
                    .await
                    .map_err(PgError::query(format!("reading changes from replication slot {slot}")))?,
            ))
        };
        let reading = |e| PgError::query(format!("reading changes from replication slot {slot}"))(e);
        let first = match stream.as_mut() {
            Some(s) => s.try_next().await.map_err(reading)?,
            None => None,
        };
        let mut read = started.elapsed();
        let Some(first) = first else {
            // Every transaction that committed before `upto` is applied. `upto` is a record
            // boundary (the insert position), so moving the slot there skips no commit record
            // that straddles it; with synchronous_commit = off the WAL writer flushes a commit
            // a moment after it returned, hence the wait.
            if flushed >= pages.record_end(upto) {
                if upto > position {
                    advance(&client, slot, upto).await?;
                    position = upto;
                }
                if !opts.follow {
                    break;
                }
                let idle = Instant::now();
                while idle.elapsed() < opts.poll && !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(25).min(opts.poll)).await;
                }
                upto = current_lsn(&client).await?;
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            continue;
        };
        let stream = stream.as_mut().expect("a row came from it");
        let mut batch = BatchReport { from_lsn: pgoutput::format_lsn(position), ..Default::default() };
        let mut oids: HashMap<u32, usize> = HashMap::new();
        let mut txn_lsn: Option<u64> = None;
        let mut end_lsn = None;
        // The rows are decoded as they arrive. A transaction larger than a batch is applied in
        // parts: its first changes are committed with its commit LSN and how many of each
        // table's changes in it are in (see [`Mark::Inside`]), while the next part is read
        // (PostgreSQL decodes it meanwhile), their rows freed once applied; the slot moves
        // only past whole transactions.
        let mut rows: Vec<tokio_postgres::Row> = Vec::new();
        let mut messages = 0usize;
        let mut next = Some(first);
        let mut apply_time = Duration::ZERO;
        let mut part_started = started;
        // The part being applied while the next one is read (one at a time: a table's parts
        // commit in order).
        let mut inflight: Option<InFlight> = None;
        while let Some(row) = next.take() {
            rows.push(row);
            messages += 1;
            let m = rows.len() - 1;
            // Decoded and folded; an error leaves nothing writing behind it.
            let folded = (|| -> Result<(), IngestError> {
                let data = rows.message(m);
                let msg =
                    pgoutput::decode(data).map_err(|e| IngestError::Cdc { message: format!("slot {slot}: {e}") })?;
                match msg {
                    Message::Begin { final_lsn, .. } => {
                        txn_lsn = Some(final_lsn);
                        for st in &mut states {
                            st.in_txn = 0;
                        }
                    }
                    Message::Commit { end_lsn: end, commit_time, .. } => {
                        end_lsn = Some(end);
                        txn_lsn = None;
                        batch.transactions += 1;
                        batch.last_commit_micros = Some(commit_time + weir_postgres::PG_EPOCH_MICROS);
                    }
                    Message::Relation(rel) => {
                        if rel.namespace != "public" {
                            return Ok(());
                        }
                        if let Some(i) = states.iter().position(|s| s.source.name == rel.name) {
                            states[i].relation(&rel)?;
                            oids.insert(rel.oid, i);
                        }
                    }
                    Message::Insert { relation, new } => {
                        if let Some(st) = pick(&mut states, &oids, relation, txn_lsn, &mut batch.changes) {
                            st.insert(m, new)?;
                        }
                    }
                    Message::Update { relation, old, new } => {
                        if let Some(st) = pick(&mut states, &oids, relation, txn_lsn, &mut batch.changes) {
                            st.update(m, old, new)?;
                        }
                    }
                    Message::Delete { relation, old } => {
                        if let Some(st) = pick(&mut states, &oids, relation, txn_lsn, &mut batch.changes) {
                            st.delete(m, old)?;
                        }
                    }
                    Message::Truncate { relations, .. } => {
                        for r in relations {
                            if let Some(st) = pick(&mut states, &oids, r, txn_lsn, &mut batch.changes) {
                                st.truncate();
                            }
                        }
                    }
                    Message::Type { .. } | Message::Origin | Message::Logical => {}
                }
                Ok(())
            })();
            if let Err(e) = folded {
                InFlight::settle(inflight).await;
                return Err(e);
            }
            if let Some(commit) = txn_lsn
                && rows.len() >= opts.batch_changes.max(1) as usize
            {
                // Inside a transaction of more changes than a batch holds: its part so far is
                // applied while the next is read, once the part before it is in.
                let clock = Instant::now();
                if let Some(done) = inflight.take() {
                    done.finish(&mut states, &mut report, &mut on_batch).await?;
                    if stop.load(Ordering::Relaxed) {
                        // Stopped between two parts: the tables hold the first one(s), the
                        // slot stays before the transaction, and the next sync goes on from
                        // there (the part just read is read again then).
                        report.inside = true;
                        break 'batches;
                    }
                }
                apply_time += clock.elapsed();
                let mark = Mark::Inside { commit };
                let part: Arc<dyn Messages> = Arc::new(std::mem::take(&mut rows));
                let detached: Vec<TableState> = states.iter_mut().map(|st| st.detach(mark)).collect();
                let mut of_part = std::mem::replace(
                    &mut batch,
                    BatchReport { from_lsn: pgoutput::format_lsn(position), ..Default::default() },
                );
                of_part.to_lsn = pgoutput::format_lsn(commit);
                of_part.inside = true;
                tracing::info!(
                    slot,
                    transaction = pgoutput::format_lsn(commit).as_str(),
                    changes = of_part.changes,
                    "sync: a transaction larger than a batch, applied in parts"
                );
                let (lake, slot) = (lake.clone(), slot.clone());
                let task = tokio::spawn(async move { apply_all(detached, &lake, &slot, mark, part).await });
                inflight = Some(InFlight { task, report: of_part, started: part_started });
                part_started = Instant::now();
            }
            let clock = Instant::now();
            next = match stream.try_next().await {
                Ok(n) => n,
                Err(e) => {
                    InFlight::settle(inflight).await;
                    return Err(reading(e).into());
                }
            };
            read += clock.elapsed();
        }
        // The last part of a transaction applied in parts goes in after the one before it.
        let clock = Instant::now();
        if let Some(done) = inflight.take() {
            done.finish(&mut states, &mut report, &mut on_batch).await?;
        }
        apply_time += clock.elapsed();
        let Some(end) = end_lsn.filter(|_| txn_lsn.is_none()) else {
            return Err(IngestError::Cdc {
                message: format!("slot {slot}: the batch ended inside a transaction; nothing more was applied"),
            });
        };
        // The changes are folded, each pointing at its tuple in the rows: every table builds
        // its Arrow batch from them first thing in its task, and the rows are freed once the
        // last one has, before the merges.
        let clock = Instant::now();
        states = apply_all(states, lake, slot, Mark::After(end), Arc::new(rows)).await?;
        apply_time += clock.elapsed();
        let applied = started.elapsed();
        // Fewer changes than asked for: decoding stopped at `upto`, not at the batch's size,
        // so every transaction that committed before `upto` is in this batch and the slot
        // moves there at once (another peek would decode the day's WAL again only to find
        // nothing: 0.4 s for a day at SF 10).
        let drained = messages < opts.batch_changes.max(1) as usize;
        let confirm = if drained { end.max(upto) } else { end };
        // Only now that every table's commit is durable may PostgreSQL recycle the WAL.
        advance(&client, slot, confirm).await?;
        tracing::debug!(
            messages,
            read = read.as_secs_f64(),
            decode = applied.saturating_sub(apply_time + read).as_secs_f64(),
            apply = apply_time.as_secs_f64(),
            advance = (started.elapsed() - applied).as_secs_f64(),
            "sync: batch"
        );
        position = confirm;
        batch.to_lsn = pgoutput::format_lsn(end);
        batch.seconds = part_started.elapsed().as_secs_f64();
        take_changes(&mut states, &mut report, &mut batch);
        on_batch(&batch);
        if drained {
            if !opts.follow {
                break;
            }
            upto = current_lsn(&client).await?;
        }
    }
    if position > started_at {
        pull_restart_point(&client, slot).await;
    }
    report.lsn = pgoutput::format_lsn(position);
    Ok(report)
}

/// Where a commit leaves a table in the stream of transactions.
#[derive(Debug, Clone, Copy)]
enum Mark {
    /// Past a transaction: its end LSN (every transaction that committed before it is in).
    After(u64),
    /// Inside a transaction larger than a batch: its commit LSN (every transaction before it
    /// is in) and, for each table, how many of its changes to that table are in
    /// ([`TableState::in_txn`], recorded under [`PARTIAL_APP_ID`]).
    Inside { commit: u64 },
}

/// Applies what every table folded, each in a task of its own (building a table's batch and
/// merging it are CPU work): each commit records its own table's position, so a crash
/// between them replays each table from where it stands. Every task is awaited before an
/// error is returned: none is left writing behind a retry.
async fn apply_all(
    states: Vec<TableState>,
    lake: &Lake,
    slot: &str,
    mark: Mark,
    rows: Arc<dyn Messages>,
) -> Result<Vec<TableState>, IngestError> {
    let tasks: Vec<_> = states
        .into_iter()
        .map(|mut st| {
            let (lake, slot, rows) = (lake.clone(), slot.to_string(), rows.clone());
            tokio::spawn(async move {
                let clock = Instant::now();
                let result = st.apply(&lake, &slot, mark, rows).await;
                if result.is_ok() && st.changes.version.is_some() {
                    tracing::debug!(
                        table = st.source.name.as_str(),
                        seconds = clock.elapsed().as_secs_f64(),
                        "sync: applied"
                    );
                }
                (st, result)
            })
        })
        .collect();
    drop(rows);
    let mut states = Vec::with_capacity(tasks.len());
    let mut failed = None;
    for task in tasks {
        match task.await {
            Ok((st, result)) => {
                states.push(st);
                if let Err(e) = result {
                    failed.get_or_insert(e);
                }
            }
            Err(e) => {
                failed.get_or_insert(IngestError::Cdc { message: format!("applying a batch failed: {e}") });
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(states),
    }
}

/// A part of a transaction larger than a batch, being applied while the next one is read.
struct InFlight {
    task: tokio::task::JoinHandle<Result<Vec<TableState>, IngestError>>,
    report: BatchReport,
    started: Instant,
}

impl InFlight {
    /// Before an error returns: the part in flight, if any, is waited for (its outcome aside),
    /// so that nothing is left writing behind the error.
    async fn settle(inflight: Option<InFlight>) {
        if let Some(done) = inflight {
            let _ = done.task.await;
        }
    }

    /// Waits for the part to be in and reports it. The tables reading on learn what its
    /// commits changed in the lake (columns added).
    async fn finish(
        self,
        states: &mut [TableState],
        report: &mut SyncReport,
        on_batch: &mut impl FnMut(&BatchReport),
    ) -> Result<(), IngestError> {
        let mut applied = self
            .task
            .await
            .map_err(|e| IngestError::Cdc { message: format!("applying a part of a transaction failed: {e}") })??;
        for (st, done) in states.iter_mut().zip(&applied) {
            if done.lake_columns.len() > st.lake_columns.len() {
                st.lake_columns.clone_from(&done.lake_columns);
            }
        }
        let mut batch = self.report;
        batch.seconds = self.started.elapsed().as_secs_f64();
        take_changes(&mut applied, report, &mut batch);
        on_batch(&batch);
        Ok(())
    }
}

/// Moves what the tables received into the batch's report and the run's totals.
fn take_changes(states: &mut [TableState], report: &mut SyncReport, batch: &mut BatchReport) {
    for (st, total) in states.iter_mut().zip(report.tables.iter_mut()) {
        let c = std::mem::take(&mut st.changes);
        total.add(&c);
        if c != TableChanges::default() {
            batch.tables.push(TableChanges { table: st.source.name.clone(), ..c });
        }
    }
    report.batches += 1;
    report.transactions += batch.transactions;
    report.changes += batch.changes;
}

/// After an advance PostgreSQL has moved the slot's restart point only as far as the first
/// `running_xacts` record past the position confirmed before it (a slot holds one candidate at
/// a time), so the restart point lags by about the WAL the sync read: PostgreSQL keeps it, and
/// the next sync's peek decodes it again in full (and its advance once more) before reaching
/// anything new. Advancing the slot to the position it already stands at decodes that WAL once
/// in fast-forward mode (no changes collected, far cheaper than a peek) and takes the restart
/// point to the last such record before it. Only a failure to save time, so a warning.
async fn pull_restart_point(client: &Client, slot: &str) {
    let started = Instant::now();
    let pulled = async {
        let row = client
            .query_one(
                "SELECT (confirmed_flush_lsn - restart_lsn)::bigint, confirmed_flush_lsn::text
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(PgError::query(format!("reading replication slot {slot}")))?;
        let (behind, confirmed): (Option<i64>, Option<String>) = (row.get(0), row.get(1));
        match (behind, confirmed) {
            (Some(behind), Some(confirmed)) if behind >= RESTART_BEHIND => {
                advance(client, slot, parse_lsn(&confirmed)?).await?;
                Ok::<_, IngestError>(Some(behind))
            }
            _ => Ok(None),
        }
    };
    match pulled.await {
        Ok(Some(behind)) => tracing::debug!(
            slot,
            behind_mib = behind >> 20,
            seconds = started.elapsed().as_secs_f64(),
            "sync: restart point pulled up"
        ),
        Ok(None) => {}
        Err(e) => tracing::warn!(
            "replication slot {slot}: moving its restart point up failed ({e}); PostgreSQL keeps more WAL until the next sync"
        ),
    }
}

/// How far (bytes of WAL) the restart point may lag the confirmed position before a sync
/// pulls it up.
const RESTART_BEHIND: i64 = 16 << 20;

/// The table a change is for, unless its transaction is already in that table's Delta log.
fn pick<'a>(
    states: &'a mut [TableState],
    oids: &HashMap<u32, usize>,
    relation: u32,
    txn_lsn: Option<u64>,
    changes: &mut u64,
) -> Option<&'a mut TableState> {
    let st = &mut states[*oids.get(&relation)?];
    // The first changes of a transaction the table holds part of are in it too.
    let held = txn_lsn.is_some_and(|l| l < st.applied || (l == st.applied && st.in_txn < st.partial));
    st.in_txn += 1;
    if held {
        st.changes.skipped += 1;
        return None;
    }
    *changes += 1;
    Some(st)
}

async fn advance(client: &Client, slot: &str, lsn: u64) -> Result<(), IngestError> {
    client
        .query_one(
            "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)::text",
            &[&slot, &pgoutput::format_lsn(lsn)],
        )
        .await
        .map_err(PgError::query(format!("advancing replication slot {slot}")))?;
    Ok(())
}

/// One LSN from a query returning it as text.
async fn query_lsn(
    client: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    context: &str,
) -> Result<u64, IngestError> {
    let text: String = client.query_one(sql, params).await.map_err(PgError::query(context))?.get(0);
    parse_lsn(&text)
}

async fn flush_lsn(client: &Client) -> Result<u64, IngestError> {
    query_lsn(client, "SELECT pg_current_wal_flush_lsn()::text", &[], "reading the flushed WAL position").await
}

/// WAL page geometry: the insert position right after a page header is where the previous
/// record ended (the flush position then stops at the page boundary, short of it).
struct WalPages {
    block: u64,
    segment: u64,
}

impl WalPages {
    async fn read(client: &Client) -> Result<Self, IngestError> {
        let row = client
            .query_one(
                "SELECT current_setting('wal_block_size')::bigint, pg_size_bytes(current_setting('wal_segment_size'))",
                &[],
            )
            .await
            .map_err(PgError::query("reading the WAL page size"))?;
        let (block, segment): (i64, i64) = (row.get(0), row.get(1));
        Ok(Self { block: block.max(1) as u64, segment: segment.max(1) as u64 })
    }

    /// The end of the last record before `insert` (PostgreSQL's XLogBytePosToEndRecPtr).
    fn record_end(&self, insert: u64) -> u64 {
        const SHORT_HEADER: u64 = 24;
        const LONG_HEADER: u64 = 40;
        if insert % self.segment == LONG_HEADER {
            insert - LONG_HEADER
        } else if insert % self.block == SHORT_HEADER {
            insert - SHORT_HEADER
        } else {
            insert
        }
    }
}

/// Where the next WAL record goes: every committed transaction's commit record ends at or
/// before it, and no record straddles it (unlike the write and flush positions).
async fn current_lsn(client: &Client) -> Result<u64, IngestError> {
    query_lsn(client, "SELECT pg_current_wal_insert_lsn()::text", &[], "reading the WAL position").await
}

fn parse_lsn(text: &str) -> Result<u64, IngestError> {
    pgoutput::parse_lsn(text).ok_or_else(|| IngestError::Cdc { message: format!("unreadable LSN {text:?}") })
}

async fn slot_position(client: &Client, slot: &str) -> Result<u64, IngestError> {
    let sql = "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1";
    query_lsn(client, sql, &[&slot], &format!("reading replication slot {slot}")).await
}

/// The slot must exist (created by the backfill, before its snapshot), be a pgoutput slot in
/// this database, and be free.
async fn check_slot(client: &Client, slot: &str) -> Result<(), IngestError> {
    let level: String = client.query_one("SHOW wal_level", &[]).await.map_err(PgError::query("SHOW wal_level"))?.get(0);
    if level != "logical" {
        return Err(IngestError::WalLevel { level });
    }
    let row = client
        .query_opt(
            "SELECT plugin::text, slot_type, database::text = current_database(), active_pid
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(PgError::query(format!("looking up replication slot {slot}")))?;
    let Some(row) = row else {
        return Err(IngestError::Cdc {
            message: format!(
                "replication slot {slot} does not exist; `weir backfill` creates it together with the snapshot CDC starts from (a slot created now would miss every change since the backfill: run `weir backfill --force`)"
            ),
        });
    };
    let (plugin, kind, here, pid): (Option<String>, String, Option<bool>, Option<i32>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if kind != "logical" || plugin.as_deref() != Some("pgoutput") {
        return Err(IngestError::Cdc {
            message: format!(
                "replication slot {slot} is a {kind} slot with plugin {}; weir sync needs a logical pgoutput slot",
                plugin.unwrap_or_default()
            ),
        });
    }
    if here != Some(true) {
        return Err(IngestError::Cdc { message: format!("replication slot {slot} belongs to another database") });
    }
    if let Some(pid) = pid {
        return Err(IngestError::Cdc {
            message: format!("replication slot {slot} is in use by PostgreSQL backend {pid} (another weir sync?)"),
        });
    }
    Ok(())
}

/// Every synced table must be in the publication named like the slot: a table added to a
/// publication only publishes changes from then on, so one missing now has lost changes.
async fn check_publication(client: &Client, publication: &str, tables: &[SourceTable]) -> Result<(), IngestError> {
    let published = published_tables(client, publication).await?;
    for t in tables {
        if !published.contains(&t.name) {
            return Err(IngestError::Cdc {
                message: format!(
                    "table {} is not in publication {publication}, so its changes since the backfill were not recorded; `weir backfill --tables {} --force` adds it and lands it again",
                    t.name, t.name
                ),
            });
        }
    }
    Ok(())
}

/// The tables of schema public in a publication (none if it does not exist).
async fn published_tables(client: &Client, publication: &str) -> Result<Vec<String>, IngestError> {
    Ok(client
        .query(
            "SELECT tablename::text FROM pg_publication_tables WHERE pubname = $1 AND schemaname = 'public'",
            &[&publication],
        )
        .await
        .map_err(PgError::query(format!("reading publication {publication}")))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Creates the publication CDC reads (named like the slot) or adds missing tables to it.
/// Called by the backfill before it fixes its starting LSN, so no change is unpublished.
pub async fn ensure_publication(client: &Client, name: &str, tables: &[SourceTable]) -> Result<(), IngestError> {
    let exists: bool = client
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)", &[&name])
        .await
        .map_err(PgError::query(format!("looking up publication {name}")))?
        .get(0);
    let published = if exists { published_tables(client, name).await? } else { Vec::new() };
    let missing: Vec<String> = tables
        .iter()
        .filter(|t| !published.contains(&t.name))
        .map(|t| format!("public.{}", quote_ident(&t.name)))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let sql = if exists {
        format!("ALTER PUBLICATION {} ADD TABLE {}", quote_ident(name), missing.join(", "))
    } else {
        format!("CREATE PUBLICATION {} FOR TABLE {}", quote_ident(name), missing.join(", "))
    };
    client.batch_execute(&sql).await.map_err(PgError::query(format!("publishing the source tables ({sql})")))?;
    Ok(())
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The tables of `tables` whose Delta log says they hold part of a transaction `weir sync`
/// has not finished (a sync stopped or killed between its parts): a derive now would see it
/// half applied.
pub async fn tables_inside_a_transaction(lake: &Lake, tables: &[SourceTable]) -> Result<Vec<String>, IngestError> {
    let mut inside = Vec::new();
    for t in tables {
        let rel = t.bronze_path();
        let table = weir_lake::open_table(lake, &rel).await?;
        if table.version().is_none() {
            continue;
        }
        if partial_count(&table, &rel).await? > 0 {
            inside.push(rel.replace('/', "."));
        }
    }
    Ok(inside)
}

/// How many changes of the transaction committing at its applied LSN a table's log says it
/// holds ([`PARTIAL_APP_ID`]; 0 when none).
async fn partial_count(table: &DeltaTable, rel: &str) -> Result<u64, IngestError> {
    let state = table.snapshot().map_err(|e| delta_err(rel, e))?;
    let count =
        state.transaction_version(table.log_store().as_ref(), PARTIAL_APP_ID).await.map_err(|e| delta_err(rel, e))?;
    Ok(count.map_or(0, |v| v.max(0) as u64))
}

/// The position a table's Delta log says it holds: the LSN of its `weir.cdc` application
/// transaction (written by the backfill with its snapshot LSN, then by every CDC commit). A
/// table landed before the backfill wrote it falls back to its newest backfill commit's
/// `weir.snapshot_lsn`.
pub async fn applied_lsn(table: &DeltaTable, rel: &str) -> Result<Option<u64>, IngestError> {
    let state = table.snapshot().map_err(|e| delta_err(rel, e))?;
    if let Some(v) =
        state.transaction_version(table.log_store().as_ref(), APP_ID).await.map_err(|e| delta_err(rel, e))?
    {
        return Ok(Some(v as u64));
    }
    for ci in table.history(None).await.map_err(|e| delta_err(rel, e))? {
        if let Some(lsn) = ci.info.get("weir.snapshot_lsn").and_then(Json::as_str) {
            return Ok(Some(parse_lsn(lsn)?));
        }
    }
    Ok(None)
}

fn delta_err(rel: &str, e: deltalake::DeltaTableError) -> IngestError {
    IngestError::Delta(Box::new(weir_lake::DeltaError::Delta { table: rel.to_string(), source: e }))
}

/// A batch's messages as the slot returned them, one per row: the folded changes point into
/// them until each table has built its Arrow batch.
trait Messages: Send + Sync {
    fn message(&self, i: usize) -> &[u8];
}

impl Messages for Vec<tokio_postgres::Row> {
    fn message(&self, i: usize) -> &[u8] {
        self[i].get(0)
    }
}

/// What a key's last change in the batch does. A key whose first change in the batch is an
/// insert was not in PostgreSQL when the batch began, so it is not in the lake (in step with
/// it at the applied LSN): its row is inserted without looking it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Insert,
    Upsert,
    Delete,
}

impl Op {
    fn code(self) -> &'static str {
        match self {
            Op::Insert => "I",
            Op::Upsert => "U",
            Op::Delete => "D",
        }
    }
}

/// One change folded per key: the operation and the tuple after it (the old key's for a delete).
#[derive(Debug, Clone, Copy)]
struct Pending {
    op: Op,
    /// Index into [`TableState::tuples`].
    tuple: u32,
}

/// Where a tuple is: its message and its offset in it, and, for an update that left TOASTed
/// values unsent, the key's previous tuple in the batch (an index into the same list), which
/// holds them unless it left them unsent too.
#[derive(Debug, Clone, Copy)]
struct At {
    message: u32,
    offset: u32,
    prev: u32,
}

const NO_PREV: u32 = u32::MAX;

/// A key's binary values, each after its length: inline for the keys the source tables have.
type Key = SmallVec<[u8; 24]>;

struct TableState {
    source: SourceTable,
    rel: String,
    /// Transactions that committed before this LSN are in the table already.
    applied: u64,
    /// And of the transaction committing at `applied`, if any, its first this many changes to
    /// the table ([`PARTIAL_APP_ID`]).
    partial: u64,
    /// The changes to the table read so far in the transaction being read.
    in_txn: u64,
    /// The lake's columns (without a derived partition column) and their Arrow types.
    lake_columns: Vec<(String, DataType)>,
    /// The source columns as the latest relation message describes them.
    columns: Vec<PgColumn>,
    key_positions: Vec<usize>,
    pending: FxHashMap<Key, Pending>,
    tuples: Vec<At>,
    /// Every pending change is an insert (no update, delete or truncate since the last
    /// apply): the keys are new to PostgreSQL, so they are new to the lake, and the batch is
    /// appended instead of merged.
    only_inserts: bool,
    truncated: bool,
    changes: TableChanges,
}

impl TableState {
    async fn open(lake: &Lake, t: &SourceTable) -> Result<Self, IngestError> {
        let rel = t.bronze_path();
        let table = weir_lake::open_table(lake, &rel).await?;
        if table.version().is_none() {
            return Err(IngestError::Cdc {
                message: format!("{rel} is not in the lake yet: run `weir backfill` first (it also creates the slot)"),
            });
        }
        let applied = applied_lsn(&table, &rel).await?.ok_or_else(|| IngestError::Cdc {
            message: format!(
                "{rel} records no snapshot LSN (backfilled without a slot?); `weir backfill --force` records one"
            ),
        })?;
        let partial = partial_count(&table, &rel).await?;
        let schema = table.snapshot().map_err(|e| delta_err(&rel, e))?.snapshot().arrow_schema();
        let derived = t.partition.as_ref().filter(|p| p.transform.is_some()).and_then(|_| t.partition_column());
        let lake_columns = schema
            .fields()
            .iter()
            .filter(|f| Some(f.name()) != derived.as_ref())
            .map(|f| (f.name().clone(), f.data_type().clone()))
            .collect();
        Ok(Self {
            source: t.clone(),
            rel,
            applied,
            partial,
            in_txn: 0,
            lake_columns,
            columns: Vec::new(),
            key_positions: Vec::new(),
            pending: FxHashMap::default(),
            tuples: Vec::new(),
            only_inserts: true,
            truncated: false,
            changes: TableChanges::default(),
        })
    }

    /// A relation message: the source's columns now. Same as the lake's, or the lake's plus
    /// new columns at the end (ADD COLUMN); anything else is DDL CDC cannot follow.
    fn relation(&mut self, rel: &Relation) -> Result<(), IngestError> {
        let ddl = |detail: String| IngestError::Ddl { table: self.source.name.clone(), detail };
        let mut columns = Vec::with_capacity(rel.columns.len());
        for c in &rel.columns {
            let typname = pgoutput::builtin_type_name(c.type_oid).ok_or_else(|| {
                ddl(format!("column {} has type oid {}, which Weir does not land", c.name, c.type_oid))
            })?;
            let ty = PgType::from_catalog(&self.source.name, &c.name, typname, c.type_modifier, typname)?;
            columns.push(PgColumn { name: c.name.clone(), ty, nullable: true });
        }
        for (i, (name, lake_ty)) in self.lake_columns.iter().enumerate() {
            let Some(c) = columns.get(i) else {
                return Err(ddl(format!("column {name} is gone from the source (dropped or renamed)")));
            };
            if &c.name != name {
                return Err(ddl(format!("column {} is now {} (a column was dropped or renamed)", name, c.name)));
            }
            if !same_type(&c.ty.arrow_type(), lake_ty) {
                return Err(ddl(format!(
                    "column {name} changed type: {} in the source, {lake_ty} in the lake",
                    c.ty.arrow_type()
                )));
            }
        }
        let mut keys = Vec::new();
        for k in &self.source.key {
            let Some(p) = columns.iter().position(|c| &c.name == k) else {
                return Err(ddl(format!("key column {k} is gone from the source")));
            };
            keys.push(p);
        }
        self.columns = columns;
        self.key_positions = keys;
        Ok(())
    }

    fn key(&self, tuple: Tuple<'_>) -> Result<Key, IngestError> {
        let mut key = Key::new();
        for &p in &self.key_positions {
            match tuple.get(p) {
                Some(Value::Binary(b)) => {
                    key.extend_from_slice(&(b.len() as u32).to_be_bytes());
                    key.extend_from_slice(b);
                }
                other => {
                    return Err(IngestError::Cdc {
                        message: format!(
                            "table {}: key column {} arrived as {other:?}; replica identity must cover the key",
                            self.source.name, self.columns[p].name
                        ),
                    });
                }
            }
        }
        Ok(key)
    }

    /// Records where a tuple is (message `message` of the batch).
    fn at(&mut self, message: usize, tuple: Tuple<'_>, prev: u32) -> Result<u32, IngestError> {
        let (Ok(message), Ok(offset), Ok(index)) =
            (u32::try_from(message), u32::try_from(tuple.offset()), u32::try_from(self.tuples.len()))
        else {
            return Err(IngestError::Cdc {
                message: format!("table {}: a batch of over 4 billion changes or bytes per message", self.source.name),
            });
        };
        self.tuples.push(At { message, offset, prev });
        Ok(index)
    }

    fn insert(&mut self, message: usize, new: Tuple<'_>) -> Result<(), IngestError> {
        let k = self.key(new)?;
        // After a delete in this batch the key was there when it began: a replacement.
        let op = match self.pending.get(&k) {
            Some(Pending { op: Op::Delete | Op::Upsert, .. }) => Op::Upsert,
            Some(Pending { op: Op::Insert, .. }) | None => Op::Insert,
        };
        let tuple = self.at(message, new, NO_PREV)?;
        self.pending.insert(k, Pending { op, tuple });
        self.changes.inserts += 1;
        Ok(())
    }

    fn update(&mut self, message: usize, old: Option<Tuple<'_>>, new: Tuple<'_>) -> Result<(), IngestError> {
        self.only_inserts = false;
        let k = self.key(new)?;
        let unchanged = new.iter().any(|v| v == Value::Unchanged);
        if let Some(old) = old {
            let ok = self.key(old)?;
            if ok != k {
                if unchanged {
                    return Err(IngestError::Cdc {
                        message: format!(
                            "table {}: an update changed the key and left a TOASTed column unsent; set REPLICA IDENTITY FULL on it",
                            self.source.name
                        ),
                    });
                }
                self.remove(ok, message, old)?;
            }
        }
        let before = self.pending.get(&k).copied();
        // Unsent values come from the key's row earlier in the batch, if any, else the lake.
        let prev = match before {
            Some(Pending { op: Op::Insert | Op::Upsert, tuple }) if unchanged => tuple,
            _ => NO_PREV,
        };
        let op = match before {
            Some(Pending { op: Op::Insert, .. }) => Op::Insert,
            _ => Op::Upsert,
        };
        let tuple = self.at(message, new, prev)?;
        self.pending.insert(k, Pending { op, tuple });
        self.changes.updates += 1;
        Ok(())
    }

    fn delete(&mut self, message: usize, old: Tuple<'_>) -> Result<(), IngestError> {
        self.only_inserts = false;
        let k = self.key(old)?;
        self.remove(k, message, old)?;
        self.changes.deletes += 1;
        Ok(())
    }

    /// The row of `k` goes: a delete, or nothing at all for a key this batch inserted.
    fn remove(&mut self, k: Key, message: usize, old: Tuple<'_>) -> Result<(), IngestError> {
        if let Some(Pending { op: Op::Insert, .. }) = self.pending.get(&k) {
            self.pending.remove(&k);
        } else {
            let tuple = self.at(message, old, NO_PREV)?;
            self.pending.insert(k, Pending { op: Op::Delete, tuple });
        }
        Ok(())
    }

    fn truncate(&mut self) {
        self.only_inserts = false;
        self.pending.clear();
        self.tuples.clear();
        self.truncated = true;
        self.changes.truncates += 1;
    }

    /// The changes folded so far, as a state of their own to be applied at `mark` (a part of
    /// a transaction larger than a batch) while this one folds the next part. This one is
    /// left empty and, if the part commits anything to the table, at `mark` (as [`apply`]
    /// leaves a table: one the part has nothing for stays where it was).
    ///
    /// [`apply`]: TableState::apply
    fn detach(&mut self, mark: Mark) -> TableState {
        let part = TableState {
            source: self.source.clone(),
            rel: self.rel.clone(),
            applied: self.applied,
            partial: self.partial,
            in_txn: self.in_txn,
            lake_columns: self.lake_columns.clone(),
            columns: self.columns.clone(),
            key_positions: self.key_positions.clone(),
            pending: std::mem::take(&mut self.pending),
            tuples: std::mem::take(&mut self.tuples),
            only_inserts: std::mem::replace(&mut self.only_inserts, true),
            truncated: std::mem::take(&mut self.truncated),
            changes: std::mem::take(&mut self.changes),
        };
        if !part.pending.is_empty() || part.truncated {
            self.reached(mark);
        }
        part
    }

    /// The application transactions a commit at `mark` carries.
    fn marks(&self, mark: Mark) -> Vec<Transaction> {
        match mark {
            Mark::After(end) => {
                let mut txns = vec![Transaction::new(APP_ID, end as i64)];
                if self.partial > 0 {
                    txns.push(Transaction::new(PARTIAL_APP_ID, 0));
                }
                txns
            }
            Mark::Inside { commit } => vec![
                Transaction::new(APP_ID, commit as i64),
                Transaction::new(PARTIAL_APP_ID, i64::try_from(self.in_txn).unwrap_or(i64::MAX)),
            ],
        }
    }

    /// The table now holds everything up to `mark`.
    fn reached(&mut self, mark: Mark) {
        (self.applied, self.partial) = match mark {
            Mark::After(end) => (end, 0),
            Mark::Inside { commit } => (commit, self.in_txn),
        };
    }

    /// Commits this batch's changes (if any) with `mark` as the table's position.
    async fn apply(
        &mut self,
        lake: &Lake,
        slot: &str,
        mark: Mark,
        messages: Arc<dyn Messages>,
    ) -> Result<(), IngestError> {
        let (end, inside) = match mark {
            Mark::After(end) => (end, false),
            Mark::Inside { commit } => (commit, true),
        };
        let metadata = [
            ("weir.cdc.lsn".to_string(), json!(pgoutput::format_lsn(end))),
            ("weir.cdc.slot".to_string(), json!(slot)),
            ("weir.source_table".to_string(), json!(self.source.name)),
            ("weir.cdc.inside_transaction".to_string(), json!(inside)),
        ];
        if self.pending.is_empty() && !self.truncated {
            // Nothing to write (keys this batch inserted and deleted again leave nothing).
            self.only_inserts = true;
            if matches!(mark, Mark::After(_)) && self.partial > 0 {
                // The rest of a transaction the table holds part of had nothing for it: the
                // log records its end, so a count of changes in it means "inside one" alone.
                let table = weir_lake::open_table(lake, &self.rel).await?;
                let version =
                    weir_lake::commit_transactions(&table, &self.rel, HashMap::from(metadata), self.marks(mark))
                        .await?;
                self.changes.version = Some(version);
                self.reached(mark);
            }
            return Ok(());
        }
        // The batch first, so the messages are freed as soon as every table has built its own.
        let batch = match self.pending.is_empty() {
            true => None,
            false => {
                let clock = Instant::now();
                let batch = self.source_batch(messages.as_ref())?;
                tracing::trace!(
                    table = self.rel.as_str(),
                    rows = batch.num_rows(),
                    seconds = clock.elapsed().as_secs_f64(),
                    "sync: batch built"
                );
                Some(batch)
            }
        };
        drop(messages);
        let rel = self.rel.clone();
        let txns = self.marks(mark);
        let props =
            || CommitProperties::default().with_application_transactions(txns.clone()).with_metadata(metadata.clone());
        let mut table = weir_lake::open_table(lake, &rel).await?;
        if self.truncated {
            let mut delete = table.delete();
            if batch.is_some() {
                // The merge below carries the applied LSN; a crash in between replays the truncate.
                delete = delete.with_commit_properties(weir_lake::without_maintenance(
                    CommitProperties::default().with_metadata(metadata.clone()),
                ));
            } else {
                delete = delete.with_commit_properties(weir_lake::without_maintenance(props()));
            }
            let (t, m) = delete.await.map_err(|e| delta_err(&rel, e))?;
            weir_lake::maintain(&t, &rel);
            self.changes.rows_deleted += m.num_deleted_rows.unwrap_or(0) as u64;
            self.changes.version = t.version().map(|v| v as i64);
            table = t;
            self.truncated = false;
        }
        let Some(batch) = batch else {
            self.reached(mark);
            self.only_inserts = true;
            return Ok(());
        };

        // New source columns first, as their own commit (a crash after it is harmless).
        if self.columns.len() > self.lake_columns.len() {
            let added: Vec<Field> = self.columns[self.lake_columns.len()..]
                .iter()
                .map(|c| Field::new(&c.name, c.ty.arrow_type(), true))
                .collect();
            let added_schema = Schema::new(added.clone());
            let kernel: deltalake::kernel::StructType = (&added_schema)
                .try_into_kernel()
                .map_err(|e| delta_err(&rel, deltalake::DeltaTableError::Generic(e.to_string())))?;
            table = table
                .add_columns()
                .with_fields(kernel.fields().cloned().collect::<Vec<_>>())
                .await
                .map_err(|e| delta_err(&rel, e))?;
            tracing::info!(table = %rel, columns = ?added.iter().map(|f| f.name()).collect::<Vec<_>>(), "source added columns; lake schema evolved");
            self.lake_columns.extend(added.iter().map(|f| (f.name().clone(), f.data_type().clone())));
        }

        let mut on = self.source.key.clone();
        // A month partition derived from a key column is equal on both sides: it prunes files.
        if let (Some(p), Some(pc)) = (&self.source.partition, self.source.partition_column())
            && p.transform.is_some()
            && self.source.key.contains(&p.column)
        {
            on.push(pc);
        }
        let writer = crate::parquet_properties(&batch.schema(), &self.source.key);
        let only_inserts = std::mem::replace(&mut self.only_inserts, true);
        let small_files = match only_inserts {
            true => weir_lake::small_files_in_partitions_of(lake, &table, &rel, &batch).await?,
            false => 0,
        };
        if only_inserts && small_files < FOLD_APPENDED_FILES {
            // New keys only (an append-only log like price_log): written as new files, no
            // join with the table. The applied LSN goes into the same commit, as in a merge.
            let data: Vec<usize> = (0..batch.num_columns())
                .filter(|&i| {
                    let n = batch.schema_ref().field(i).name().clone();
                    n != OP && !n.starts_with(KEEP)
                })
                .collect();
            let batch = batch.project(&data).map_err(|e| delta_err(&rel, e.into()))?;
            let rows = batch.num_rows() as u64;
            let metadata =
                HashMap::from_iter(metadata.iter().cloned().chain([("weir.cdc.append".to_string(), json!(true))]));
            let version = weir_lake::append_batch(table, &rel, batch, writer, metadata, txns).await?;
            self.changes.rows_inserted += rows;
            self.changes.version = Some(version);
            self.reached(mark);
            return Ok(());
        }
        if only_inserts {
            // As many small files as an append may leave: merged instead (its inserts are not
            // looked up either), which folds them into the new files with the change data feed
            // holding the new rows alone.
            tracing::debug!(table = rel.as_str(), small_files, "sync: small files folded into an insert-only batch");
        }
        let (table, m) =
            weir_lake::merge_by_key(lake, table, &rel, batch, &on, writer, props(), Default::default(), None).await?;
        self.changes.rows_inserted += m.inserted;
        self.changes.rows_updated += m.updated;
        self.changes.rows_deleted += m.deleted;
        self.changes.version = table.version().map(|v| v as i64);
        self.reached(mark);
        Ok(())
    }

    /// The folded changes as one Arrow batch in the lake's column types (decoded by the same
    /// decoder as the backfill's COPY BINARY, value by value, from the messages in place),
    /// plus the operation and keep-current flags.
    fn source_batch(&mut self, messages: &dyn Messages) -> Result<RecordBatch, IngestError> {
        let n = self.columns.len();
        let rows = self.pending.len();
        let tuples = std::mem::take(&mut self.tuples);
        let mut pending: Vec<Pending> = std::mem::take(&mut self.pending).into_values().collect();
        // In the order the changes arrived: the tuples are then read front to back through the
        // batch's messages instead of in hash order.
        pending.sort_unstable_by_key(|p| p.tuple);
        let corrupt = |e: pgoutput::ProtocolError| IngestError::Cdc {
            message: format!("table {}: a folded change no longer reads: {e}", self.source.name),
        };
        let tuple = |at: &At| pgoutput::tuple_at(messages.message(at.message as usize), at.offset as usize);
        let mut ops: Vec<&'static str> = Vec::with_capacity(rows);
        let mut keep: Vec<Option<BooleanBuilder>> = (0..n).map(|_| None).collect();
        let mut decoder = CopyDecoder::new(format!("{} (CDC)", self.source.name), self.columns.clone(), rows.max(1));
        let mut out = Vec::new();
        let mut values: Vec<Value<'_>> = Vec::with_capacity(n);
        for (r, p) in pending.into_iter().enumerate() {
            ops.push(p.op.code());
            let at = &tuples[p.tuple as usize];
            values.clear();
            values.extend(tuple(at).map_err(corrupt)?.iter());
            if at.prev != NO_PREV {
                // An update that left TOASTed values unsent: they are the key's earlier row's in
                // this batch (or, where that one left them unsent too, the one before it).
                for (i, v) in values.iter_mut().enumerate() {
                    let mut prev = at.prev;
                    while *v == Value::Unchanged && prev != NO_PREV {
                        let earlier = &tuples[prev as usize];
                        match tuple(earlier).map_err(corrupt)?.get(i) {
                            Some(e) => *v = e,
                            None => break,
                        }
                        prev = earlier.prev;
                    }
                }
            }
            for (i, kb) in keep.iter_mut().enumerate() {
                let unchanged = values.get(i) == Some(&Value::Unchanged);
                if unchanged && kb.is_none() {
                    let mut b = BooleanBuilder::with_capacity(rows);
                    b.append_n(r, false);
                    *kb = Some(b);
                }
                if let Some(b) = kb {
                    b.append_value(unchanged);
                }
            }
            if let Some(i) = values.iter().position(|v| matches!(v, Value::Text(_))) {
                return Err(IngestError::Cdc {
                    message: format!(
                        "table {}: column {} arrived in text form; the slot must be read with binary 'true'",
                        self.source.name, self.columns[i].name
                    ),
                });
            }
            let fields = (0..n).map(|i| match values.get(i) {
                Some(Value::Binary(b)) => Some(*b),
                _ => None,
            });
            decoder.push_row(fields, &mut out)?;
        }
        decoder.flush(&mut out);
        let decoded = arrow_schema(&self.columns);
        let batch = arrow_select_concat(&decoded, &out)?;
        let with_part_schema = partition::table_schema(&self.source, decoded)?;
        let batch = partition::with_partition(&self.source, &with_part_schema, batch)?;

        let mut fields: Vec<Field> = batch.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
        let mut arrays: Vec<ArrayRef> = batch.columns().to_vec();
        fields.push(Field::new(OP, DataType::Utf8, false));
        arrays.push(Arc::new(StringArray::from(ops)));
        for (i, kb) in keep.iter_mut().enumerate() {
            if let Some(b) = kb {
                fields.push(Field::new(format!("{KEEP}{}", self.columns[i].name), DataType::Boolean, false));
                arrays.push(Arc::new(b.finish()));
            }
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
            .map_err(|e| IngestError::Cdc { message: format!("table {}: {e}", self.source.name) })
    }
}

fn arrow_select_concat(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<RecordBatch, IngestError> {
    deltalake::arrow::compute::concat_batches(schema, batches).map_err(|e| IngestError::Cdc { message: e.to_string() })
}

/// Arrow types the lake may report for a source type (string and binary views included).
fn same_type(source: &DataType, lake: &DataType) -> bool {
    use DataType::*;
    match (source, lake) {
        (Utf8, Utf8 | Utf8View | LargeUtf8) => true,
        (Binary, Binary | BinaryView | LargeBinary) => true,
        (FixedSizeBinary(_), FixedSizeBinary(_) | Binary | BinaryView) => true,
        (a, b) => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Array;

    fn table() -> TableState {
        let src = SourceTable { name: "t".into(), key: vec!["id".into()], partition: None, chunk: None };
        let mut st = TableState {
            source: src,
            rel: "bronze/t".into(),
            applied: 0,
            partial: 0,
            in_txn: 0,
            lake_columns: vec![("id".into(), DataType::Int64), ("v".into(), DataType::Utf8)],
            columns: Vec::new(),
            key_positions: Vec::new(),
            pending: FxHashMap::default(),
            tuples: Vec::new(),
            only_inserts: true,
            truncated: false,
            changes: TableChanges::default(),
        };
        st.relation(&rel(&[("id", 20), ("v", 25)])).unwrap();
        st
    }

    fn rel(cols: &[(&str, u32)]) -> Relation {
        Relation {
            oid: 1,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: b'd',
            columns: cols
                .iter()
                .map(|(n, oid)| pgoutput::RelationColumn {
                    name: n.to_string(),
                    key: *n == "id",
                    type_oid: *oid,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    impl Messages for Vec<Vec<u8>> {
        fn message(&self, i: usize) -> &[u8] {
            &self[i]
        }
    }

    /// A tuple `(id, v)` as pgoutput sends it (`v` unsent when None).
    fn row(id: i64, v: Option<&str>) -> Vec<u8> {
        let mut b = 2i16.to_be_bytes().to_vec();
        b.push(b'b');
        b.extend_from_slice(&8i32.to_be_bytes());
        b.extend_from_slice(&id.to_be_bytes());
        match v {
            Some(s) => {
                b.push(b'b');
                b.extend_from_slice(&(s.len() as i32).to_be_bytes());
                b.extend_from_slice(s.as_bytes());
            }
            None => b.push(b'u'),
        }
        b
    }

    /// The batch's messages, each one tuple (or an old tuple then a new one: [`old_new`]).
    struct Batch(Vec<Vec<u8>>);

    impl Batch {
        fn new() -> Self {
            Self(Vec::new())
        }
        /// Adds a message; its index and tuple.
        fn push(&mut self, data: Vec<u8>) -> usize {
            self.0.push(data);
            self.0.len() - 1
        }
        fn tuple(&self, m: usize, offset: usize) -> Tuple<'_> {
            pgoutput::tuple_at(&self.0[m], offset).unwrap()
        }
        fn insert(&mut self, st: &mut TableState, id: i64, v: Option<&str>) -> Result<(), IngestError> {
            let m = self.push(row(id, v));
            st.insert(m, self.tuple(m, 0))
        }
        fn update(&mut self, st: &mut TableState, id: i64, v: Option<&str>) -> Result<(), IngestError> {
            let m = self.push(row(id, v));
            st.update(m, None, self.tuple(m, 0))
        }
        /// An update sending the old row too (a key change when the ids differ).
        fn old_new(
            &mut self,
            st: &mut TableState,
            old: (i64, Option<&str>),
            new: (i64, Option<&str>),
        ) -> Result<(), IngestError> {
            let first = row(old.0, old.1);
            let at = first.len();
            let m = self.push([first, row(new.0, new.1)].concat());
            st.update(m, Some(self.tuple(m, 0)), self.tuple(m, at))
        }
        fn delete(&mut self, st: &mut TableState, id: i64, v: Option<&str>) -> Result<(), IngestError> {
            let m = self.push(row(id, v));
            st.delete(m, self.tuple(m, 0))
        }
    }

    fn folded(st: &mut TableState, batch: &Batch) -> Vec<(i64, String, Option<String>, bool)> {
        let b = st.source_batch(&batch.0).unwrap();
        let ids = b.column(0).as_any().downcast_ref::<arrow_array::Int64Array>().unwrap();
        let vs = b.column(1).as_any().downcast_ref::<StringArray>().unwrap();
        let ops = b.column_by_name(OP).unwrap().as_any().downcast_ref::<StringArray>().unwrap();
        let keep = b
            .column_by_name("__weir_keep_v")
            .map(|a| a.as_any().downcast_ref::<arrow_array::BooleanArray>().unwrap().clone());
        let mut out: Vec<_> = (0..b.num_rows())
            .map(|i| {
                (
                    ids.value(i),
                    ops.value(i).to_string(),
                    vs.is_valid(i).then(|| vs.value(i).to_string()),
                    keep.as_ref().is_some_and(|k| k.value(i)),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// A table holding the first changes of a transaction larger than a batch (its commit LSN
    /// and their count): replayed, those changes are skipped and the rest applied; earlier
    /// transactions are skipped whole, later ones applied whole. A commit inside a transaction
    /// records both; the next one after it resets the count.
    #[test]
    fn a_transaction_applied_in_part_is_replayed_from_where_the_table_stands() {
        let mut states = vec![table()];
        states[0].applied = 500;
        states[0].partial = 2;
        let oids = HashMap::from([(1, 0)]);
        let mut changes = 0;
        let mut picked =
            |states: &mut Vec<TableState>, txn: u64| pick(states, &oids, 1, Some(txn), &mut changes).is_some();
        assert!(!picked(&mut states, 400), "a transaction that committed before it: in the table");
        states[0].in_txn = 0;
        let replay: Vec<bool> = (0..4).map(|_| picked(&mut states, 500)).collect();
        assert_eq!(replay, [false, false, true, true], "its first two changes are in the table, the rest not");
        assert_eq!(states[0].changes.skipped, 3);
        assert_eq!(
            states[0]
                .marks(Mark::Inside { commit: 500 })
                .iter()
                .map(|t| (t.app_id.as_str(), t.version))
                .collect::<Vec<_>>(),
            [(APP_ID, 500), (PARTIAL_APP_ID, 4)]
        );
        states[0].reached(Mark::Inside { commit: 500 });
        assert_eq!((states[0].applied, states[0].partial), (500, 4));
        assert!(picked(&mut states, 500), "read on in the same run: the fifth change is new");
        assert_eq!(
            states[0].marks(Mark::After(520)).iter().map(|t| (t.app_id.as_str(), t.version)).collect::<Vec<_>>(),
            [(APP_ID, 520), (PARTIAL_APP_ID, 0)],
            "the transaction's end resets the count"
        );
        states[0].reached(Mark::After(520));
        assert_eq!((states[0].applied, states[0].partial), (520, 0));
        assert_eq!(states[0].marks(Mark::After(600)).len(), 1, "no count to reset");
        states[0].in_txn = 0;
        assert!(picked(&mut states, 520), "a transaction committing where the last one ended is new");
    }

    #[test]
    fn a_part_detached_for_applying_takes_the_fold_and_leaves_the_table_at_its_mark() {
        let (mut st, mut b) = (table(), Batch::new());
        let (oids, mut changes) = (HashMap::from([(1, 0)]), 0);
        st.applied = 100;
        let mut states = vec![st];
        for id in 1..=3 {
            pick(&mut states, &oids, 1, Some(500), &mut changes).expect("a new transaction");
            b.update(&mut states[0], id, Some("x")).unwrap();
        }
        let mark = Mark::Inside { commit: 500 };
        let mut part = states[0].detach(mark);
        assert_eq!(folded(&mut part, &b).len(), 3, "the part holds the changes folded so far");
        assert_eq!((part.applied, part.partial, part.in_txn), (100, 0, 3), "and where the table was");
        assert_eq!(part.marks(mark).iter().map(|t| t.version).collect::<Vec<_>>(), [500, 3]);
        assert!(!part.only_inserts && part.changes.updates == 3);
        let st = &states[0];
        assert!(st.pending.is_empty() && st.tuples.is_empty() && st.only_inserts && !st.truncated);
        assert_eq!(st.changes, TableChanges::default(), "counted once, with the part");
        assert_eq!((st.applied, st.partial, st.in_txn), (500, 3, 3), "the table reads on from the part's mark");
        // A table the part has nothing for stays where it was (the part commits nothing to it).
        let mut idle = table();
        idle.applied = 100;
        idle.in_txn = 7;
        let empty = idle.detach(mark);
        assert!(empty.pending.is_empty());
        assert_eq!((idle.applied, idle.partial), (100, 0));
    }

    #[test]
    fn only_a_batch_of_inserts_is_appended() {
        let (mut st, mut b) = (table(), Batch::new());
        b.insert(&mut st, 1, Some("a")).unwrap();
        b.insert(&mut st, 2, Some("b")).unwrap();
        assert!(st.only_inserts, "new keys only");
        for change in [
            |st: &mut TableState, b: &mut Batch| b.update(st, 1, Some("c")).unwrap(),
            |st: &mut TableState, b: &mut Batch| b.delete(st, 2, Some("b")).unwrap(),
            |st: &mut TableState, _: &mut Batch| st.truncate(),
        ] {
            let (mut st, mut b) = (table(), Batch::new());
            b.insert(&mut st, 3, Some("x")).unwrap();
            change(&mut st, &mut b);
            b.insert(&mut st, 4, Some("y")).unwrap();
            assert!(!st.only_inserts, "an update, delete or truncate in the batch means a merge");
        }
    }

    #[test]
    fn the_last_change_of_a_key_wins_and_keys_the_batch_inserted_are_new() {
        let (mut st, mut b) = (table(), Batch::new());
        b.insert(&mut st, 1, Some("a")).unwrap();
        b.update(&mut st, 1, Some("b")).unwrap();
        b.insert(&mut st, 2, Some("x")).unwrap();
        b.delete(&mut st, 2, Some("x")).unwrap();
        b.update(&mut st, 3, Some("c")).unwrap();
        b.delete(&mut st, 4, Some("d")).unwrap();
        b.insert(&mut st, 4, Some("e")).unwrap();
        b.delete(&mut st, 6, Some("f")).unwrap();
        assert_eq!(
            folded(&mut st, &b),
            vec![
                // inserted, then updated: still new to the lake
                (1, "I".into(), Some("b".into()), false),
                // key 2 came and went within the batch: nothing
                (3, "U".into(), Some("c".into()), false),
                // deleted, then inserted again: it was there, so a replacement
                (4, "U".into(), Some("e".into()), false),
                (6, "D".into(), Some("f".into()), false)
            ]
        );
        assert_eq!((st.changes.inserts, st.changes.updates, st.changes.deletes), (3, 2, 3));
    }

    #[test]
    fn a_key_change_deletes_the_old_key_and_unchanged_values_come_from_the_batch_or_the_lake() {
        let (mut st, mut b) = (table(), Batch::new());
        b.old_new(&mut st, (1, Some("a")), (5, Some("a"))).unwrap();
        b.insert(&mut st, 7, Some("seven")).unwrap();
        b.update(&mut st, 7, None).unwrap();
        b.update(&mut st, 8, None).unwrap();
        // Unsent twice in a row: the value comes from two changes back.
        b.update(&mut st, 10, Some("ten")).unwrap();
        b.update(&mut st, 10, None).unwrap();
        b.update(&mut st, 10, None).unwrap();
        assert_eq!(
            folded(&mut st, &b),
            vec![
                (1, "D".into(), Some("a".into()), false),
                (5, "U".into(), Some("a".into()), false),
                (7, "I".into(), Some("seven".into()), false),
                (8, "U".into(), None, true),
                (10, "U".into(), Some("ten".into()), false)
            ]
        );
        assert!(b.old_new(&mut st, (8, Some("x")), (9, None)).is_err(), "key change with an unsent TOAST value");
    }

    #[tokio::test]
    async fn a_batch_whose_inserts_were_deleted_again_writes_nothing_and_the_next_appends() {
        let (mut st, mut b) = (table(), Batch::new());
        b.insert(&mut st, 1, Some("a")).unwrap();
        b.delete(&mut st, 1, Some("a")).unwrap();
        assert!(st.pending.is_empty() && !st.only_inserts);
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("lake");
        let location = weir_core::LakeLocation::Local { root: root.clone() };
        let lake = Lake::open(location, &weir_core::S3Settings::default(), false).unwrap();
        st.apply(&lake, "slot", Mark::After(42), Arc::new(b.0)).await.unwrap();
        assert!(st.only_inserts, "the next batch of inserts is appended, not merged");
        assert!(!root.join("bronze").exists(), "nothing was written");
    }

    #[test]
    fn the_insert_position_after_a_page_header_is_the_previous_records_end() {
        let p = WalPages { block: 8192, segment: 16 << 20 };
        assert_eq!(p.record_end(0x1BD_6018), 0x1BD_6000);
        assert_eq!(p.record_end(0x200_0028), 0x200_0000, "a segment's first page has the long header");
        assert_eq!(p.record_end(0x1BD_45D0), 0x1BD_45D0);
    }

    #[test]
    fn a_truncate_drops_earlier_changes() {
        let (mut st, mut b) = (table(), Batch::new());
        b.insert(&mut st, 1, Some("a")).unwrap();
        st.truncate();
        b.insert(&mut st, 2, Some("b")).unwrap();
        assert!(st.truncated);
        assert_eq!(folded(&mut st, &b), vec![(2, "I".into(), Some("b".into()), false)], "new to the emptied table");
    }

    #[test]
    fn ddl_other_than_add_column_is_refused_by_name() {
        let mut st = table();
        let e = st.relation(&rel(&[("id", 20)])).unwrap_err().to_string();
        assert!(e.contains("table t") && e.contains("column v is gone"), "{e}");
        let e = st.relation(&rel(&[("id", 20), ("v", 23)])).unwrap_err().to_string();
        assert!(e.contains("column v changed type"), "{e}");
        let e = st.relation(&rel(&[("id", 20), ("w", 25)])).unwrap_err().to_string();
        assert!(e.contains("column v is now w"), "{e}");
        st.relation(&rel(&[("id", 20), ("v", 25), ("extra", 23)])).unwrap();
        assert_eq!(st.columns.len(), 3);
        // A tuple from before the ADD COLUMN is padded with NULL.
        let mut b = Batch::new();
        b.insert(&mut st, 4, Some("d")).unwrap();
        let b = st.source_batch(&b.0).unwrap();
        assert_eq!(b.column_by_name("extra").unwrap().null_count(), 1);
    }
}
