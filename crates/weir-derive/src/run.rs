//! `weir derive`: runs the job DAG over the lake. A table job is rebuilt only when its
//! definition, an input's version, or (if it reads it) the as-of instant changed since the
//! commit that produced it; the state it was built from is recorded in that commit.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use datafusion::catalog::MemTable;
use datafusion::dataframe::DataFrame;
use deltalake::parquet::basic::Compression;
use deltalake::parquet::file::properties::{EnabledStatistics, WriterProperties};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use futures::StreamExt;
use serde_json::{Value, json};
use weir_lake::Lake;

use crate::history;
use crate::incremental::{self, Attempt};
use crate::jobs::{Job, Jobs, Materialize, Per};
use crate::session::LakeSession;
use crate::{DeriveError, JobError, df_err};

/// Commit metadata key holding the state a derived table was built from.
pub const STATE_KEY: &str = "weir.derive";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MakeSelection {
    All,
    One(String),
}

#[derive(Debug, Clone)]
pub struct DeriveOptions {
    /// Only this job and what it reads.
    pub job: Option<String>,
    pub makes: MakeSelection,
    /// The reference instant, µs since the epoch (UTC).
    pub as_of_micros: i64,
    /// Rebuild every selected job.
    pub full: bool,
    pub target_file_bytes: usize,
}

#[derive(Debug, Clone)]
pub enum JobOutcome {
    Built {
        version: i64,
        rows: u64,
        files: usize,
        bytes: u64,
        elapsed: Duration,
    },
    UpToDate {
        version: i64,
    },
    /// Brought up to date from its inputs' change feeds (see [`crate::incremental`]).
    Incremental {
        version: i64,
        new_rows: u64,
        merged: u64,
        recomputed: u64,
        deleted: u64,
        elapsed: Duration,
    },
    View,
    /// A history job's new versions (see [`crate::history`]).
    Versioned {
        version: i64,
        opened: u64,
        closed: u64,
        elapsed: Duration,
    },
}

#[derive(Debug, Clone)]
pub struct JobReport {
    /// `silver.listing_price`, `gold.ads_vw`.
    pub output: String,
    pub outcome: JobOutcome,
    /// Why it was (re)built, or why not.
    pub reason: String,
}

/// One unit of work: a job, for one make when it is per make.
struct Unit<'a> {
    job: &'a Job,
    /// (slug, make_id) for a per-make job.
    make: Option<(String, i64)>,
    /// For a table partitioned by make_id in a one-make run: only that make's partition.
    scope: Option<i64>,
}

impl Unit<'_> {
    fn output(&self) -> String {
        self.job.output(self.make.as_ref().map(|m| m.0.as_str()))
    }
}

/// Runs the DAG. Every selected job's SQL is planned before anything is written, so a broken
/// job stops the run with its file and line and changes nothing.
pub async fn derive(
    lake: &Lake,
    jobs: &Jobs,
    bronze: &[String],
    opts: &DeriveOptions,
    mut on_start: impl FnMut(&str),
) -> Result<Vec<JobReport>, DeriveError> {
    let selected: Vec<&Job> = match &opts.job {
        Some(name) => {
            if jobs.get(name).is_none() {
                let all: Vec<&str> = jobs.ordered.iter().map(|j| j.name.as_str()).collect();
                return Err(DeriveError::UnknownJob(name.clone(), all.join(", ")));
            }
            jobs.upstream_of(name)
        }
        None => jobs.ordered.iter().collect(),
    };
    let clock = Instant::now();
    let mut session = LakeSession::open(lake, bronze).await?;
    tracing::debug!(seconds = clock.elapsed().as_secs_f64(), "derive: bronze tables opened");
    for job in &selected {
        for s in &job.sources {
            if let Some(("bronze", t)) = s.split_once('.')
                && !session.versions.contains_key(s)
            {
                return Err(DeriveError::MissingBronze(t.to_string()));
            }
        }
    }
    let one_make = matches!(opts.makes, MakeSelection::One(_));
    let slugs = if one_make || selected.iter().any(|j| j.per.is_some()) {
        make_slugs(&session, &opts.makes).await?
    } else {
        vec![]
    };
    let mut units = Vec::new();
    for job in &selected {
        match job.per {
            Some(Per::Make) => units.extend(slugs.iter().map(|m| Unit { job, make: Some(m.clone()), scope: None })),
            None => {
                let scoped = one_make && job.materialize == Materialize::Table && job.partition == [MAKE_ID];
                units.push(Unit { job, make: None, scope: slugs.first().filter(|_| scoped).map(|m| m.1) })
            }
        }
    }

    // Register what already exists, then plan everything (placeholders stand in for outputs
    // that do not exist yet).
    let clock = Instant::now();
    let outputs: Vec<String> =
        units.iter().filter(|u| u.job.materialize == Materialize::Table).map(|u| u.output()).collect();
    session.register_deltas(lake, &outputs).await?;
    tracing::debug!(seconds = clock.elapsed().as_secs_f64(), units = units.len(), "derive: outputs opened");
    let clock = Instant::now();
    for u in &units {
        let df = plan(&session, u, opts.as_of_micros).await?;
        if u.job.materialize == Materialize::View || !session.versions.contains_key(&u.output()) {
            let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
            let empty = MemTable::try_new(schema, vec![vec![]]).map_err(df_err("a placeholder"))?;
            session.replace(&u.output(), Arc::new(empty))?;
        }
    }

    tracing::debug!(seconds = clock.elapsed().as_secs_f64(), "derive: every unit planned");

    // Per-make units share their large view sources (silver.listing: every listing): when a
    // run rebuilds several makes, such a view is computed once and split by make, instead of
    // being scanned and filtered once per make (a one-make run scans it once, filtered).
    let several_makes = units.iter().filter_map(|u| u.make.as_ref()).collect::<BTreeSet<_>>().len() > 1;
    let mut splits = MakeSplits::default();
    let shared = incremental::Shared::default();
    let mut not_incremental: BTreeMap<String, String> = BTreeMap::new();

    // Tokens of what each relation is: tables by version, views by definition and inputs.
    let mut tokens: BTreeMap<String, String> =
        session.versions.iter().map(|(k, v)| (k.clone(), format!("v{v}"))).collect();
    let mut reports = Vec::new();
    // Per-make incremental units, brought up to date two at a time before the loop reaches
    // them (their inputs are all built by then); what could not be done incrementally is
    // rebuilt by the loop.
    let mut ahead: BTreeMap<String, Result<(Attempt, Duration), DeriveError>> = BTreeMap::new();
    // What update_ahead read of the units it left to the loop (their last commit, unchanged).
    let mut stored_states: BTreeMap<String, StoredState> = BTreeMap::new();
    for (i, u) in units.iter().enumerate() {
        let first_of_job = i == 0 || !std::ptr::eq(units[i - 1].job, u.job);
        let out = u.output();
        let _clock = UnitClock(out.clone(), Instant::now());
        if first_of_job
            && u.make.is_some()
            && !opts.full
            && u.job.incremental.as_ref().is_some_and(incremental::shares_rules)
        {
            let group: Vec<&Unit> = units[i..].iter().take_while(|v| std::ptr::eq(v.job, u.job)).collect();
            ahead = update_ahead(lake, &session, jobs, &group, &tokens, opts, &shared, &mut stored_states).await?;
        }
        let state = unit_state(u, jobs, &tokens, opts);
        if let Some(done) = ahead.remove(&out) {
            match done {
                Ok((Attempt::Done(r), elapsed)) => {
                    tokens.insert(out.clone(), format!("v{}", r.version));
                    reports.push(incremental_report(out, r, elapsed));
                    continue;
                }
                Ok((Attempt::NotApplicable(why), _)) => not_incremental.insert(out.clone(), why),
                Err(e) => return Err(e),
            };
        }
        match u.job.materialize {
            Materialize::View => {
                let df = plan(&session, u, opts.as_of_micros).await?;
                session.replace(&out, df.into_view())?;
                tokens.insert(out.clone(), format!("view:{}", state));
                let reason = match &u.make {
                    Some(_) => "a view, computed when read (not stored)",
                    None => "planned into its readers",
                };
                reports.push(JobReport { output: out, outcome: JobOutcome::View, reason: reason.into() });
            }
            Materialize::Table | Materialize::History => {
                let rel = out.replace('.', "/");
                let table = session.table(lake, &out).await?;
                let stored = match stored_states.remove(&out) {
                    Some(stored) => stored,
                    None => stored_state(&table, &rel).await?,
                };
                tracing::trace!(unit = out.as_str(), "stored state read");
                let built_from = stored.built_from(u.scope);
                let reason =
                    if built_from.is_none() && u.scope.is_none() && !stored.partitions.is_empty() && !opts.full {
                        Some(format!("{MAKE_ID} partitions were derived alone since the last whole build"))
                    } else {
                        why_rebuild(built_from.as_ref(), &state, opts.full)
                    }
                    .map(|r| match u.scope {
                        Some(id) => format!("{MAKE_ID}={id} only: {r}"),
                        None => r,
                    });
                let Some(reason) = reason else {
                    let version = table.version().map_or(0, |v| v as i64);
                    tokens.insert(out.clone(), format!("v{version}"));
                    reports.push(JobReport {
                        output: out,
                        outcome: JobOutcome::UpToDate { version },
                        reason: "inputs and definition unchanged".into(),
                    });
                    continue;
                };
                on_start(&out);
                let t = Instant::now();
                let recorded = stored.with(u.scope, state.clone());
                let mut reason = reason;
                if let Some(why) = not_incremental.remove(&out) {
                    reason = format!("{reason} (not incremental: {why})");
                } else if let (Some(inc), false, Some(previous)) = (&u.job.incremental, opts.full, built_from.as_ref())
                {
                    match incremental::attempt(
                        lake,
                        &session,
                        u.job,
                        inc,
                        u.make.as_ref().map(|(s, id)| (s.as_str(), *id)),
                        u.scope,
                        &out,
                        table.clone(),
                        previous,
                        &state,
                        &recorded,
                        opts.as_of_micros,
                        &shared,
                    )
                    .await?
                    {
                        Attempt::Done(r) => {
                            session.register_delta(lake, &out).await?;
                            tokens.insert(out.clone(), format!("v{}", r.version));
                            let mut report = incremental_report(out, r, t.elapsed());
                            if let Some(id) = u.scope {
                                report.reason = format!("{MAKE_ID}={id} only: {}", report.reason);
                            }
                            reports.push(report);
                            continue;
                        }
                        Attempt::NotApplicable(why) => reason = format!("{reason} (not incremental: {why})"),
                    }
                }
                let swapped = match &u.make {
                    Some((_, make_id)) if several_makes => splits.swap_in(&session, jobs, u.job, *make_id).await?,
                    _ => vec![],
                };
                let df = plan(&session, u, opts.as_of_micros).await;
                for (name, original) in swapped {
                    session.replace(&name, original)?;
                }
                let df = df?;
                tracing::trace!(unit = out.as_str(), seconds = t.elapsed().as_secs_f64(), "planned for writing");
                let df = match (u.job.materialize, table.version()) {
                    (Materialize::History, Some(_)) => {
                        let r = history::apply(lake, &session, u.job, &out, table, df, &recorded, opts.as_of_micros)
                            .await?;
                        session.register_delta(lake, &out).await?;
                        tokens.insert(out.clone(), format!("v{}", r.version));
                        reports.push(JobReport {
                            output: out,
                            outcome: JobOutcome::Versioned {
                                version: r.version,
                                opened: r.opened,
                                closed: r.closed,
                                elapsed: t.elapsed(),
                            },
                            reason,
                        });
                        continue;
                    }
                    (Materialize::History, None) => history::opened(df, opts.as_of_micros)?,
                    _ => df,
                };
                let (rows, files, bytes, version, table) = write(lake, table, &rel, u, df, &recorded, opts).await?;
                session.register_table(&out, table).await?;
                tracing::trace!(unit = out.as_str(), "registered");
                tokens.insert(out.clone(), format!("v{version}"));
                reports.push(JobReport {
                    output: out,
                    outcome: JobOutcome::Built { version, rows, files, bytes, elapsed: t.elapsed() },
                    reason,
                });
            }
        }
    }
    Ok(reports)
}

pub(crate) use crate::session::MAKE_ID;

/// Logs how long a unit took (at debug level) however its turn of the loop ends.
struct UnitClock(String, Instant);

impl Drop for UnitClock {
    fn drop(&mut self) {
        tracing::debug!(unit = self.0.as_str(), seconds = self.1.elapsed().as_secs_f64(), "derive: unit done");
    }
}

/// The derivation state recorded in the table's last commit (empty for a new table).
async fn stored_state(table: &deltalake::DeltaTable, rel: &str) -> Result<StoredState, DeriveError> {
    Ok(match weir_lake::last_commit_info(table, rel).await? {
        Some(info) => StoredState::parse(info.get(STATE_KEY)),
        None => StoredState::default(),
    })
}

/// The state a unit is built from: its definition, its inputs' tokens, the as-of if read.
fn unit_state(u: &Unit<'_>, jobs: &Jobs, tokens: &BTreeMap<String, String>, opts: &DeriveOptions) -> Value {
    // A per-make unit reads a per-make source for its own make (`silver.ads_base` as
    // `silver.ads_base_<slug>`).
    let own: BTreeMap<&str, String> = match &u.make {
        Some((slug, _)) => u.job.own_make_sources(jobs, slug).collect(),
        None => BTreeMap::new(),
    };
    let token = |s: &String| {
        let relation = own.get(s.as_str()).unwrap_or(s);
        tokens.get(relation).cloned().unwrap_or_else(|| "none".into())
    };
    let inputs: BTreeMap<String, String> = u.job.sources.iter().map(|s| (s.clone(), token(s))).collect();
    let mut state = json!({ "definition": u.job.fingerprint, "inputs": inputs });
    if u.job.uses_as_of() {
        state["as_of_micros"] = json!(opts.as_of_micros);
    }
    if let Some((s, _)) = &u.make {
        state["slug"] = json!(s);
    }
    state
}

fn incremental_report(output: String, r: incremental::IncrementalReport, elapsed: Duration) -> JobReport {
    let phases: Vec<String> = r.phases.iter().map(|(n, d)| format!("{n} {:.2} s", d.as_secs_f64())).collect();
    JobReport {
        output,
        outcome: JobOutcome::Incremental {
            version: r.version,
            new_rows: r.new_rows,
            merged: r.merged,
            recomputed: r.recomputed,
            deleted: r.deleted,
            elapsed,
        },
        reason: format!("{} ({})", r.inputs.join(", "), phases.join(", ")),
    }
}

/// A unit whose stored state is behind its inputs.
struct Pending<'a, 'b> {
    unit: &'a Unit<'b>,
    out: String,
    table: deltalake::DeltaTable,
    previous: Value,
    state: Value,
    recorded: Value,
}

async fn attempt_ahead(
    lake: &Lake,
    session: &LakeSession,
    p: Pending<'_, '_>,
    opts: &DeriveOptions,
    shared: &incremental::Shared,
) -> (String, Result<(Attempt, Duration), DeriveError>) {
    let t = Instant::now();
    let u = p.unit;
    let inc = u.job.incremental.as_ref().expect("checked by the caller");
    let make = u.make.as_ref().map(|(s, id)| (s.as_str(), *id));
    let r = incremental::attempt(
        lake,
        session,
        u.job,
        inc,
        make,
        u.scope,
        &p.out,
        p.table,
        &p.previous,
        &p.state,
        &p.recorded,
        opts.as_of_micros,
        shared,
    )
    .await
    .map(|a| (a, t.elapsed()));
    (p.out, r)
}

/// Brings the per-make units of one job up to date from their inputs' change feeds, two at a
/// time (the first computes the affected keys every unit shares while the other waits for
/// them). Units that are up to date, or never built, are left to the loop.
#[allow(clippy::too_many_arguments)]
async fn update_ahead(
    lake: &Lake,
    session: &LakeSession,
    jobs: &Jobs,
    group: &[&Unit<'_>],
    tokens: &BTreeMap<String, String>,
    opts: &DeriveOptions,
    shared: &incremental::Shared,
    left: &mut BTreeMap<String, StoredState>,
) -> Result<BTreeMap<String, Result<(Attempt, Duration), DeriveError>>, DeriveError> {
    let clock = Instant::now();
    let mut todo = Vec::new();
    for u in group {
        let out = u.output();
        let table = session.table(lake, &out).await?;
        let stored = stored_state(&table, &out).await?;
        let state = unit_state(u, jobs, tokens, opts);
        let Some(previous) = stored.built_from(None).filter(|p| why_rebuild(Some(p), &state, false).is_some()) else {
            // Up to date, or never built whole: the loop decides, from what was read here.
            left.insert(out, stored);
            continue;
        };
        let recorded = stored.with(None, state.clone());
        todo.push(Pending { unit: u, out, table, previous, state, recorded });
    }
    tracing::debug!(seconds = clock.elapsed().as_secs_f64(), units = group.len(), "derive: states of the units read");
    let mut done = BTreeMap::new();
    let handle = tokio::runtime::Handle::current();
    if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread && todo.len() > 1 {
        // Planning and Parquet encoding are CPU work done inside the future: two OS threads,
        // each taking the next unit as it finishes one, use two cores. The first unit computes
        // the keys and the restricted sources every unit shares, holding the rules lock; the
        // other thread's first unit waits for them, so the shared work runs alone and the
        // first unit's own SQL and merge run beside the next.
        let queue = std::sync::Mutex::new(todo.into_iter());
        let results = tokio::task::block_in_place(|| {
            std::thread::scope(|scope| {
                let workers: Vec<_> = (0..2)
                    .map(|_| {
                        let (handle, queue) = (handle.clone(), &queue);
                        scope.spawn(move || {
                            handle.block_on(async {
                                let mut out = Vec::new();
                                loop {
                                    // The guard goes at the end of this statement, before the await.
                                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                                    let Some(p) = next else { break };
                                    out.push(attempt_ahead(lake, session, p, opts, shared).await);
                                }
                                out
                            })
                        })
                    })
                    .collect();
                workers.into_iter().flat_map(|w| w.join().expect("a derive thread panicked")).collect::<Vec<_>>()
            })
        });
        done.extend(results);
    } else {
        for p in todo {
            let (out, r) = attempt_ahead(lake, session, p, opts, shared).await;
            done.insert(out, r);
        }
    }
    Ok(done)
}

/// View sources of per-make jobs, computed once per run and split by make_id.
#[derive(Default)]
struct MakeSplits {
    /// By view name: its schema and its rows by make_id.
    views: BTreeMap<String, (SchemaRef, std::collections::HashMap<i64, Vec<arrow::record_batch::RecordBatch>>)>,
}

impl MakeSplits {
    /// Registers, for each view source of `job` with a make_id column, a table of just
    /// `make_id`'s rows; returns the providers it replaced, to be put back once the unit is
    /// planned.
    async fn swap_in(
        &mut self,
        session: &LakeSession,
        jobs: &Jobs,
        job: &Job,
        make_id: i64,
    ) -> Result<Vec<(String, Arc<dyn datafusion::catalog::TableProvider>)>, DeriveError> {
        let mut swapped = Vec::new();
        for src in &job.sources {
            let view = jobs.ordered.iter().find(|j| j.per.is_none() && j.output(None) == *src);
            if view.is_none_or(|j| j.materialize != Materialize::View) {
                continue;
            }
            let original = session.ctx.table_provider(src.as_str()).await.map_err(df_err(format!("reading {src}")))?;
            if original.schema().field_with_name(MAKE_ID).is_err() {
                continue;
            }
            if !self.views.contains_key(src) {
                let split = split_by_make(session, src).await?;
                self.views.insert(src.clone(), split);
            }
            let (schema, parts) = &self.views[src];
            let rows = parts.get(&make_id).cloned().unwrap_or_default();
            let table = MemTable::try_new(schema.clone(), vec![rows]).map_err(df_err(format!("splitting {src}")))?;
            session.replace(src, Arc::new(table))?;
            swapped.push((src.clone(), original));
        }
        Ok(swapped)
    }
}

/// A view's rows, computed once, grouped by make_id (rows without one can match no make).
async fn split_by_make(
    session: &LakeSession,
    view: &str,
) -> Result<(SchemaRef, std::collections::HashMap<i64, Vec<arrow::record_batch::RecordBatch>>), DeriveError> {
    let err = |e: arrow::error::ArrowError| DeriveError::Write { table: view.to_string(), message: e.to_string() };
    let df = session.ctx.table(view).await.map_err(df_err(format!("reading {view}")))?;
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await.map_err(df_err(format!("computing {view}")))?;
    let mut parts: std::collections::HashMap<i64, Vec<arrow::record_batch::RecordBatch>> = Default::default();
    for batch in batches {
        let ids =
            arrow::compute::cast(batch.column_by_name(MAKE_ID).expect("checked"), &arrow::datatypes::DataType::Int64)
                .map_err(err)?;
        let ids = ids.as_any().downcast_ref::<arrow::array::Int64Array>().expect("cast to Int64");
        let mut rows: std::collections::HashMap<i64, Vec<u32>> = Default::default();
        for (i, id) in ids.iter().enumerate() {
            if let Some(id) = id {
                rows.entry(id).or_default().push(i as u32);
            }
        }
        for (id, idx) in rows {
            let idx = arrow::array::UInt32Array::from(idx);
            parts.entry(id).or_default().push(arrow::compute::take_record_batch(&batch, &idx).map_err(err)?);
        }
    }
    Ok((schema, parts))
}

/// What a derived table was built from, as recorded in its last commit: the state of the
/// last whole-table build, and of each partition derived alone since (rebuilt or merged).
#[derive(Debug, Default, Clone)]
struct StoredState {
    all: Option<Value>,
    partitions: serde_json::Map<String, Value>,
}

impl StoredState {
    fn parse(v: Option<&Value>) -> Self {
        let Some(v) = v.and_then(|v| v.as_str()).and_then(|s| serde_json::from_str::<Value>(s).ok()) else {
            return Self::default();
        };
        StoredState {
            all: v.get("all").filter(|a| !a.is_null()).cloned(),
            partitions: v.get("partitions").and_then(|p| p.as_object()).cloned().unwrap_or_default(),
        }
    }

    /// The state the whole table (None) or one partition was built from, if it is uniform.
    fn built_from(&self, scope: Option<i64>) -> Option<Value> {
        match scope {
            None if self.partitions.is_empty() => self.all.clone(),
            None => None,
            Some(id) => self.partitions.get(&id.to_string()).cloned().or_else(|| self.all.clone()),
        }
    }

    /// The record after building the whole table (None) or one partition from `state`.
    fn with(&self, scope: Option<i64>, state: Value) -> Value {
        match scope {
            None => json!({ "all": state, "partitions": {} }),
            Some(id) => {
                let mut partitions = self.partitions.clone();
                partitions.insert(id.to_string(), state);
                json!({ "all": self.all, "partitions": partitions })
            }
        }
    }
}

/// The as-of instant (µs) the build of a table, or of its `make_id` partition, recorded, if
/// it read one.
pub fn recorded_as_of(state: Option<&Value>, make_id: Option<i64>) -> Option<i64> {
    StoredState::parse(state).built_from(make_id)?.get("as_of_micros")?.as_i64()
}

/// The `make_id` partitions (as text) the table was built for, by the state its last commit
/// recorded: None when it was built whole (every make), else the partitions derived alone.
pub fn built_partitions(state: Option<&Value>) -> Option<BTreeSet<String>> {
    let stored = StoredState::parse(state);
    match stored.all {
        Some(_) => None,
        None => Some(stored.partitions.keys().cloned().collect()),
    }
}

/// The default as-of instant: when the newest of the bronze tables was committed (µs), so a
/// rerun over unchanged data is the same build.
pub async fn default_as_of(lake: &Lake, bronze: &[String]) -> Result<Option<i64>, DeriveError> {
    let mut newest = None;
    for t in bronze {
        let rel = format!("bronze/{t}");
        let table = weir_lake::open_table(lake, &rel).await?;
        if table.version().is_none() {
            continue;
        }
        let mut history = table
            .history(Some(1))
            .await
            .map_err(|e| DeriveError::Write { table: rel.clone(), message: e.to_string() })?;
        if let Some(ms) = history.next().and_then(|c| c.timestamp) {
            newest = newest.max(Some(ms * 1000));
        }
    }
    Ok(newest)
}

/// None when `state` equals what the table was built from; else a short reason.
fn why_rebuild(previous: Option<&Value>, state: &Value, full: bool) -> Option<String> {
    if full {
        return Some("--full".into());
    }
    let Some(prev) = previous else { return Some("first build".into()) };
    if prev == state {
        return None;
    }
    let mut why = Vec::new();
    if prev["definition"] != state["definition"] {
        why.push("its definition changed".to_string());
    }
    if let (Some(a), Some(b)) = (prev["inputs"].as_object(), state["inputs"].as_object()) {
        for (k, v) in b {
            match a.get(k) {
                Some(old) if old == v => {}
                Some(old) => why.push(format!("{k} {} → {}", short(old), short(v))),
                None => why.push(format!("{k} is a new input")),
            }
        }
    }
    if prev.get("as_of_micros") != state.get("as_of_micros") {
        why.push("the as-of instant changed".into());
    }
    if why.is_empty() {
        why.push("its recorded state differs".into());
    }
    Some(why.join(", "))
}

fn short(v: &Value) -> String {
    let s = v.as_str().unwrap_or_default();
    if s.starts_with("view:") { "(view changed)".into() } else { s.to_string() }
}

/// (slug, make_id) of every make, by the files of the bronze.makes they were read from: a
/// Delta file is never rewritten, so the same files are the same makes (`weir run` and a
/// taxonomy change derive again and again over an unchanged bronze.makes).
static MAKES_READ: std::sync::LazyLock<std::sync::Mutex<Option<MakesRead>>> =
    std::sync::LazyLock::new(Default::default);

/// The files of bronze.makes, and the (slug, make_id) read from them.
type MakesRead = (String, Vec<(String, i64)>);

/// (slug, make_id) of the selected makes.
async fn make_slugs(session: &LakeSession, sel: &MakeSelection) -> Result<Vec<(String, i64)>, DeriveError> {
    let files = session.files_of("bronze.makes");
    let read = MAKES_READ.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let all = match (read, files) {
        (Some((key, all)), Some(files)) if key == files => all,
        (_, files) => {
            let all = crate::session::read_makes(&session.ctx).await?;
            if let Some(files) = files {
                *MAKES_READ.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((files, all.clone()));
            }
            all
        }
    };
    match sel {
        MakeSelection::All => Ok(all),
        MakeSelection::One(s) => match all.iter().find(|(a, _)| a == s) {
            Some(m) => Ok(vec![m.clone()]),
            None => {
                let names: Vec<&str> = all.iter().map(|(a, _)| a.as_str()).collect();
                Err(DeriveError::UnknownMake(s.clone(), names.join(", ")))
            }
        },
    }
}

/// Plans a unit's SQL; an error names the job file and the line. A scoped unit keeps only
/// its partition's rows (the filter is pushed down through the plan by DataFusion).
async fn plan(session: &LakeSession, u: &Unit<'_>, as_of_micros: i64) -> Result<DataFrame, DeriveError> {
    let sql = u.job.expand(u.make.as_ref().map(|(s, id)| (s.as_str(), *id)), as_of_micros);
    let df = session.ctx.sql(&sql).await.map_err(|e| plan_error(u.job, &e))?;
    match u.scope {
        None => Ok(df),
        Some(id) => df
            .filter(datafusion::prelude::col(MAKE_ID).eq(datafusion::prelude::lit(id)))
            .map_err(|e| plan_error(u.job, &e)),
    }
}

fn plan_error(job: &Job, e: &datafusion::error::DataFusionError) -> DeriveError {
    let text = e.to_string().replace('\n', " ");
    // sqlparser reports "at Line: N, Column: M" relative to the SQL body.
    let line = text
        .split("Line: ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<usize>().ok())
        .map(|n| job.file_line(n))
        .or_else(|| named_line(job, &text))
        .unwrap_or(job.sql_line);
    DeriveError::Job(JobError::new(&job.file, line, format!("the SQL does not plan: {text}")))
}

/// The schema a derived table is stored with: DataFusion's string views as plain strings,
/// and every column nullable (plans do not promise nullability consistently between the
/// logical and the physical schema; the job's key is what is declared).
fn storage_schema(s: &arrow::datatypes::Schema) -> SchemaRef {
    use arrow::datatypes::{DataType, Field};
    let fields: Vec<Field> = s
        .fields()
        .iter()
        .map(|f| {
            let t = match f.data_type() {
                DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
                DataType::BinaryView | DataType::LargeBinary => DataType::Binary,
                t => t.clone(),
            };
            Field::new(f.name(), t, true)
        })
        .collect();
    Arc::new(arrow::datatypes::Schema::new(fields))
}

fn to_storage(
    schema: &SchemaRef,
    batch: arrow::record_batch::RecordBatch,
) -> Result<arrow::record_batch::RecordBatch, arrow::error::ArrowError> {
    let cols = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(
            |(c, f)| {
                if c.data_type() == f.data_type() { Ok(c.clone()) } else { arrow::compute::cast(c, f.data_type()) }
            },
        )
        .collect::<Result<Vec<_>, _>>()?;
    arrow::record_batch::RecordBatch::try_new(schema.clone(), cols)
}

/// For errors without a position ("No field named x", "table 'y' not found"): the first
/// line of the SQL that mentions the name.
fn named_line(job: &Job, text: &str) -> Option<usize> {
    let name = ["No field named ", "table '", "Invalid function '"].iter().find_map(|m| {
        let rest = text.split(m).nth(1)?;
        let token: String = rest
            .trim_start_matches(['"', '\''])
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '.')
            .collect();
        let token = token.trim_end_matches('.');
        Some(token.rsplit('.').next().unwrap_or_default().to_string())
    })?;
    if name.is_empty() {
        return None;
    }
    job.sql.lines().position(|l| l.contains(&name)).map(|i| job.file_line(i + 1))
}

/// `batch` cut where the values of its columns `cols` change (rows sorted by them), each
/// piece with those values as text; the whole batch when `cols` is empty, nothing when the
/// batch is (an empty batch starts no partition).
fn by_partition(
    batch: arrow::record_batch::RecordBatch,
    cols: &[String],
) -> Result<Vec<(arrow::record_batch::RecordBatch, String)>, arrow::error::ArrowError> {
    weir_lake::partition_runs(&batch, cols)?
        .into_iter()
        .filter(|r| !r.is_empty())
        .map(|r| {
            let values = cols
                .iter()
                .filter_map(|c| batch.column_by_name(c))
                .map(|a| arrow::util::display::array_value_to_string(a, r.start))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((batch.slice(r.start, r.end - r.start), values.join("\u{1f}")))
        })
        .collect()
}

/// Parquet settings of derived tables: LZ4, page statistics, no dictionaries (their values,
/// prices and times and ids, are mostly distinct: parquet built each dictionary only to
/// abandon it: 5 % of `weir run`'s CPU, mostly in listing_price's merges).
///
/// LZ4, not zstd: every CDC day reads a sixth of `silver.listing_price` back by key and scans
/// its files in the merge, and parquet-rs creates a zstd compression and decompression
/// context for every column chunk it opens. An SF 10 day's derive on a settled lake, 11 pairs:
/// median 2.08 → 1.79 s, user CPU 2.35 → 1.82 s; listing_price's files are 37 % larger
/// (BENCHMARKS, session 29). Bronze stays zstd: it is the bulk of the lake and written once.
pub(crate) fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::LZ4_RAW)
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_dictionary_enabled(false)
        .build()
}

/// [`writer_properties`] for tables stored in key order and read by key: pages of at most
/// [`LOOKUP_PAGE_ROWS`] rows (a lookup decodes one page of each column; no dictionaries: it
/// would read and decode every column's whole dictionary page before its one data page).
pub(crate) fn lookup_writer_properties() -> WriterProperties {
    writer_properties().into_builder().set_data_page_row_count_limit(LOOKUP_PAGE_ROWS).build()
}

/// Rows per data page of key-ordered tables: a point lookup decodes this many rows per column.
pub const LOOKUP_PAGE_ROWS: usize = 4096;

async fn write(
    lake: &Lake,
    table: deltalake::DeltaTable,
    rel: &str,
    u: &Unit<'_>,
    df: DataFrame,
    state: &Value,
    opts: &DeriveOptions,
) -> Result<(u64, usize, u64, i64, deltalake::DeltaTable), DeriveError> {
    let job = u.job;
    let schema = storage_schema(df.schema().as_arrow());
    for p in &job.partition {
        if schema.field_with_name(p).is_err() {
            return Err(JobError::new(&job.file, 1, format!("partition column {p} is not in the output")).into());
        }
    }
    for k in &job.key {
        if schema.field_with_name(k).is_err() {
            return Err(JobError::new(&job.file, 1, format!("key column {k} is not in the output")).into());
        }
    }
    let werr = |m: String| DeriveError::Write { table: rel.to_string(), message: m };
    let (df, props) = if job.key_ranged() {
        // Marts are what Flight clients and the FDW look up by key: stored in key order with
        // small pages, a lookup's page-index pruning decodes one page per column, not the file.
        // A partitioned one in key order within each partition.
        let order =
            job.partition.iter().chain(&job.key).map(|k| datafusion::prelude::ident(k).sort(true, false)).collect();
        let df = df.sort(order).map_err(df_err(format!("sorting {}", job.file.display())))?;
        (df, lookup_writer_properties())
    } else {
        (df, writer_properties())
    };
    let partition = if job.partition.is_empty() { None } else { Some(job.partition.clone()) };
    let mut writer = RecordBatchWriter::try_new(
        lake.table_url(rel).as_str(),
        schema.clone(),
        partition,
        Some(lake.storage_options().clone()),
    )
    .map_err(|e| werr(e.to_string()))?
    .with_writer_properties(props);
    tracing::trace!(table = rel, "writer ready");
    let mut stream = df.execute_stream().await.map_err(df_err(format!("running {}", job.file.display())))?;
    let mut adds = Vec::new();
    let mut rows = 0u64;
    // A mart is cut into files of key ranges (its rows come sorted): an incremental update
    // rewrites only the files its keys fall in (see incremental::KEY_RANGE_FILE_ROWS).
    let file_rows = if job.key_ranged() { crate::incremental::KEY_RANGE_FILE_ROWS } else { usize::MAX };
    let mut in_file = 0usize;
    // The partition the key-ranged rows being written are in: a file holds one partition's
    // rows, so the next partition's first rows start a file of their own.
    let mut in_partition: Option<String> = None;
    let partition_cols: &[String] = if job.key_ranged() { &job.partition } else { &[] };
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(df_err(format!("running {}", job.file.display())))?;
        rows += batch.num_rows() as u64;
        for (mut batch, part) in by_partition(batch, partition_cols).map_err(|e| werr(e.to_string()))? {
            if in_partition.as_ref().is_some_and(|p| *p != part) && in_file > 0 {
                adds.extend(writer.flush().await.map_err(|e| werr(e.to_string()))?);
                in_file = 0;
            }
            in_partition = Some(part);
            while batch.num_rows() > 0 {
                let take = batch.num_rows().min(file_rows - in_file);
                let part = to_storage(&schema, batch.slice(0, take)).map_err(|e| werr(e.to_string()))?;
                batch = batch.slice(take, batch.num_rows() - take);
                writer.write(part).await.map_err(|e| werr(e.to_string()))?;
                in_file += take;
                if in_file >= file_rows || writer.buffer_len() >= opts.target_file_bytes {
                    adds.extend(writer.flush().await.map_err(|e| werr(e.to_string()))?);
                    in_file = 0;
                }
            }
        }
    }
    adds.extend(writer.flush().await.map_err(|e| werr(e.to_string()))?);
    tracing::debug!(table = rel, files = adds.len(), "derive: files written");
    let files = adds.len();
    let bytes: u64 = adds.iter().map(|a| a.size as u64).sum();
    let mut meta = std::collections::HashMap::new();
    meta.insert(STATE_KEY.to_string(), Value::String(state.to_string()));
    meta.insert("weir.derive.rows".to_string(), json!(rows));
    meta.insert("weir.derive.key".to_string(), json!(job.key));
    let value = u.scope.map(|id| id.to_string());
    let partition = value.as_deref().map(|v| (MAKE_ID, v));
    let (version, table) = {
        // A table read by key: its files' statistics are the key's alone (the other columns'
        // bounds span every file, and made a mart's log 2.5 KB a file to write and to read).
        let stats = job.key_ranged().then_some(job.key.as_slice());
        weir_lake::commit_files(table, rel, &schema, &job.partition, adds, meta, partition, None, stats).await?
    };
    tracing::debug!(table = rel, version, "derive: committed");
    Ok((rows, files, bytes, version, table))
}
