//! Incremental table jobs: a job that declares `[incremental]` is brought up to date from its
//! inputs' Delta change data feeds instead of rebuilt, when every input that changed since
//! the table's last build changed only through CDC commits (`weir sync`).
//!
//! - The fold source's inserted rows (`new_rows`) are run through the job's own SQL (as
//!   `delta`) and combined with the table's rows (`current`) by the job's `merge` SQL: the
//!   history is never read again.
//! - Keys whose result cannot be merged (the fold source's deleted or updated rows, and what
//!   each `affects` rule returns for a changed source) are recomputed by the job's SQL with
//!   the fold source restricted to those keys; keys that produce no row are deleted.
//! - Everything lands in one Delta MERGE by key, whose commit records the same state a full
//!   build records. The result equals a full rebuild (checked by the end-to-end tests).

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, new_null_array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::MemTable;
use datafusion::common::ScalarValue;
use datafusion::prelude::{col, in_list, lit};
use deltalake::DeltaTable;
use deltalake::delta_datafusion::DeltaCdfTableProvider;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::parquet::file::properties::WriterProperties;
use serde_json::{Value, json};
use weir_lake::Lake;

use crate::jobs::{Incremental, Job};
use crate::session::{LakeSession, MAKE_ID};
use crate::{DeriveError, df_err};

/// Key values found by rules (FxHash: a hundred thousand keys and more a run, hashed twice).
type ScalarSet = rustc_hash::FxHashSet<ScalarValue>;

/// What an incremental update did.
#[derive(Debug, Clone, Default)]
pub struct IncrementalReport {
    pub version: i64,
    /// Inserted rows of the fold source folded in.
    pub new_rows: u64,
    /// Keys updated from `delta` and `current`.
    pub merged: u64,
    /// Keys recomputed from their whole history, and those of them that are gone.
    pub recomputed: u64,
    pub deleted: u64,
    /// `bronze.price_log v3 → v4`, …
    pub inputs: Vec<String>,
    /// Where the time went: reading the change feeds, the rules, the fold of the new rows and
    /// its merge SQL, the recomputed keys, the Delta MERGE.
    pub phases: Vec<(&'static str, std::time::Duration)>,
}

pub enum Attempt {
    Done(IncrementalReport),
    /// Why the job is rebuilt instead.
    NotApplicable(String),
}

/// A changed input: name, the version the table was built from, the version now.
struct Changed {
    name: String,
    from: i64,
    to: i64,
}

/// A changed input's change data feed over the range, or why it cannot be read as one.
/// `t` is the input at version `c.to`.
async fn change_feed(
    lake: &Lake,
    t: DeltaTable,
    c: &Changed,
) -> Result<Result<Arc<DeltaCdfTableProvider>, String>, DeriveError> {
    let rel = c.name.replace('.', "/");
    let enabled = t
        .snapshot()
        .map(|s| s.table_config().enable_change_data_feed.unwrap_or(false))
        .map_err(|e| DeriveError::Write { table: c.name.clone(), message: e.to_string() })?;
    if !enabled {
        return Ok(Err(format!("{} has no change data feed (a new `weir backfill --force` enables it)", c.name)));
    }
    let (marker, what) = if c.name.starts_with("bronze.") {
        ("weir.cdc.lsn", "a CDC commit (a backfill?)")
    } else {
        ("weir.derive.incremental", "an incremental commit (a rebuild?)")
    };
    let latest = t.version().map_or(0, |v| v as i64);
    let history = t
        .history(Some((latest - c.from).max(0) as usize))
        .await
        .map_err(|e| DeriveError::Write { table: c.name.clone(), message: e.to_string() })?;
    // A vacuum may have deleted files of commits before its horizon.
    let horizon = weir_lake::vacuum_horizon(lake, &rel).await?;
    for (i, ci) in history.enumerate() {
        let v = latest - i as i64;
        if v > c.from && v <= c.to {
            if !ci.info.contains_key(marker) {
                return Ok(Err(format!("{} v{v} is not {what}", c.name)));
            }
            if let (Some(h), Some(t)) = (horizon, ci.timestamp)
                && t < h
            {
                return Ok(Err(format!("{} v{v} is older than its last vacuum's horizon", c.name)));
            }
        }
    }
    let cdf = DeltaCdfTableProvider::try_new(
        t.scan_cdf().with_starting_version(c.from as u64 + 1).with_ending_version(c.to as u64),
    )
    .map_err(|e| DeriveError::Write { table: c.name.clone(), message: e.to_string() })?;
    Ok(Ok(Arc::new(cdf)))
}

fn version_of(token: Option<&Value>) -> Option<i64> {
    token?.as_str()?.strip_prefix('v')?.parse().ok()
}

/// The state a view token (`view:{…}`) records.
fn view_state(token: Option<&Value>) -> Option<Value> {
    serde_json::from_str(token?.as_str()?.strip_prefix("view:")?).ok()
}

/// The stored tables that changed between two recorded input maps, looking through views
/// (a view's token records its definition and its own inputs): name → (from, to).
fn changed_tables(
    before: &serde_json::Map<String, Value>,
    now: &serde_json::Map<String, Value>,
    out: &mut std::collections::BTreeMap<String, (i64, i64)>,
) -> Result<(), String> {
    for (name, token) in now {
        let old = before.get(name);
        if old == Some(token) {
            continue;
        }
        if let (Some(a), Some(b)) = (view_state(old), view_state(Some(token))) {
            if a.get("definition") != b.get("definition") {
                return Err(format!("the view {name}'s definition changed"));
            }
            if a.get("as_of_micros") != b.get("as_of_micros") {
                return Err(format!("the view {name} reads the as-of, which changed"));
            }
            let (Some(ia), Some(ib)) =
                (a.get("inputs").and_then(Value::as_object), b.get("inputs").and_then(Value::as_object))
            else {
                return Err(format!("the view {name} has no recorded inputs"));
            };
            changed_tables(ia, ib, out)?;
            continue;
        }
        let (Some(from), Some(to)) = (version_of(old), version_of(Some(token))) else {
            return Err(format!("{name} changed and is not a stored table"));
        };
        if to < from {
            return Err(format!("{name} v{from} → v{to} went back"));
        }
        if out.insert(name.clone(), (from, to)).is_some_and(|r| r != (from, to)) {
            return Err(format!("{name} is read at two versions"));
        }
    }
    Ok(())
}

/// The keys to recompute as a one-column table, and as sets with and without those
/// removed outright (every mart of a run looks its rows up in the same sets); integer keys
/// also as the scope of a merge that deletes the ones left without a row.
#[derive(Clone)]
struct AffectedKeys {
    keys: RecordBatch,
    key_set: Arc<KeySet>,
    all_set: Arc<KeySet>,
    scope: Option<weir_lake::KeyScope>,
}

/// A set of key values: integers as `i64` (every mart of a run looks its rows up in the same
/// sets, a hundred thousand keys and more), other types as scalars.
enum KeySet {
    Int(weir_core::IntSet),
    Any(ScalarSet),
}

impl KeySet {
    fn of_values(values: &[ScalarValue]) -> Self {
        // Matched by variant: a cast per value (`ScalarValue::cast_to`) builds arrays, and a
        // run's keys number a hundred thousand and more.
        match Self::ints(values) {
            Some(keys) => KeySet::Int(keys.into_iter().collect()),
            None => KeySet::Any(values.iter().cloned().collect()),
        }
    }

    /// The values as `i64`, if every one is a non-NULL integer that fits.
    fn ints(values: &[ScalarValue]) -> Option<Vec<i64>> {
        values
            .iter()
            .map(|v| match *v {
                ScalarValue::Int8(Some(k)) => Some(k as i64),
                ScalarValue::Int16(Some(k)) => Some(k as i64),
                ScalarValue::Int32(Some(k)) => Some(k as i64),
                ScalarValue::Int64(Some(k)) => Some(k),
                ScalarValue::UInt8(Some(k)) => Some(k as i64),
                ScalarValue::UInt16(Some(k)) => Some(k as i64),
                ScalarValue::UInt32(Some(k)) => Some(k as i64),
                ScalarValue::UInt64(Some(k)) => i64::try_from(k).ok(),
                _ => None,
            })
            .collect()
    }

    fn of_arrays(arrays: &[&ArrayRef]) -> Result<Self, DeriveError> {
        if arrays.iter().all(|a| a.data_type().is_integer()) {
            let mut keys = Vec::new();
            for a in arrays {
                let c = arrow::compute::cast(a, &DataType::Int64).map_err(|e| df_err("reading keys")(e.into()))?;
                keys.extend(arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(&c).iter().flatten());
            }
            return Ok(KeySet::Int(keys.into_iter().collect()));
        }
        let mut values = Vec::new();
        for a in arrays {
            for i in 0..a.len() {
                values.push(ScalarValue::try_from_array(a, i).map_err(df_err("reading keys"))?);
            }
        }
        Ok(KeySet::of_values(&values))
    }

    fn is_empty(&self) -> bool {
        match self {
            KeySet::Int(s) => s.is_empty(),
            KeySet::Any(s) => s.is_empty(),
        }
    }

    /// Whether each row of `a` holds a key of the set (a NULL does not).
    fn members(&self, a: &ArrayRef) -> Result<Vec<bool>, DeriveError> {
        match self {
            KeySet::Int(set) if a.data_type().is_integer() => {
                let c = arrow::compute::cast(a, &DataType::Int64).map_err(|e| df_err("reading keys")(e.into()))?;
                let c = arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(&c);
                Ok(c.iter().map(|k| k.is_some_and(|k| set.contains(k))).collect())
            }
            KeySet::Int(_) => Ok(vec![false; a.len()]),
            KeySet::Any(set) => (0..a.len())
                .map(|i| Ok(set.contains(&ScalarValue::try_from_array(a, i).map_err(df_err("reading keys"))?)))
                .collect(),
        }
    }
}

/// Results shared by the units of one `weir derive` run (the per-make marts read the same
/// change feeds): the keys each job's rules found for a set of changed inputs, and its
/// `keyed` sources restricted to them.
#[derive(Default)]
pub struct Shared {
    /// Held while a unit runs its rules (they register `changes` and `current`).
    rules: tokio::sync::Mutex<()>,
    /// Change feeds by (input, from, to), or why an input's range is not one.
    #[allow(clippy::type_complexity)]
    feeds: std::sync::Mutex<std::collections::HashMap<(String, i64, i64), Result<Arc<DeltaCdfTableProvider>, String>>>,
    /// Small change feeds in memory, by (input, from, to): see [`rules_changes`].
    #[allow(clippy::type_complexity)]
    small: std::sync::Mutex<std::collections::HashMap<(String, i64, i64), Arc<dyn datafusion::catalog::TableProvider>>>,
    keys: std::sync::Mutex<std::collections::HashMap<String, AffectedKeys>>,
    forks: std::sync::Mutex<std::collections::HashMap<String, Vec<datafusion::prelude::SessionContext>>>,
}

impl Shared {
    fn cached_keys(&self, signature: &str) -> Option<AffectedKeys> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).get(signature).cloned()
    }

    fn cached_fork(&self, signature: &str) -> Option<Vec<datafusion::prelude::SessionContext>> {
        self.forks.lock().unwrap_or_else(|p| p.into_inner()).get(signature).cloned()
    }
}

/// Whether units of `inc`'s job may be brought up to date at the same time: their rules do
/// not read the unit's own table, so they run once and every unit shares the result.
pub fn shares_rules(inc: &Incremental) -> bool {
    inc.fold.is_none() && !rules_read_current(inc)
}

/// Whether a rule reads the unit's own table (`current`): its keys are then the unit's alone.
fn rules_read_current(inc: &Incremental) -> bool {
    inc.affects.values().chain(inc.removes.values()).any(|r| r.contains("current"))
}

/// Change feeds of at most this many rows are read once into memory for the rules.
const SMALL_FEED_ROWS: usize = 1 << 20;

/// What the rules read as `changes`: the change feed read once into memory when it is small
/// (its exact size lets DataFusion build a join from it on one partition and push the join's
/// key range into the scan of the other side, skipping files), else the feed itself.
async fn rules_changes(
    shared: &Shared,
    ctx: &datafusion::prelude::SessionContext,
    c: &Changed,
    cdf: &Arc<DeltaCdfTableProvider>,
) -> Result<Arc<dyn datafusion::catalog::TableProvider>, DeriveError> {
    use futures::StreamExt;
    let id = (c.name.clone(), c.from, c.to);
    if let Some(t) = shared.small.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
        return Ok(t.clone());
    }
    let what = || format!("reading the change feed of {}", c.name);
    let df = ctx.read_table(cdf.clone()).map_err(df_err(what()))?;
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let mut stream = df.execute_stream().await.map_err(df_err(what()))?;
    let (mut batches, mut rows) = (Vec::new(), 0);
    while let Some(b) = stream.next().await {
        let b = b.map_err(df_err(what()))?;
        rows += b.num_rows();
        if rows > SMALL_FEED_ROWS {
            return Ok(cdf.clone());
        }
        batches.push(b);
    }
    let t: Arc<dyn datafusion::catalog::TableProvider> =
        Arc::new(MemTable::try_new(schema, vec![batches]).map_err(df_err(what()))?);
    shared.small.lock().unwrap_or_else(|p| p.into_inner()).insert(id, t.clone());
    Ok(t)
}

/// Runs the job's rules over the change feed of each changed input but `skip`, read as
/// `changes` (they may read the stored table as `current`), adding the keys they find to
/// `recompute` and `removed`.
#[allow(clippy::too_many_arguments)]
async fn run_rules(
    ctx: &datafusion::prelude::SessionContext,
    shared: &Shared,
    inc: &Incremental,
    out: &str,
    feeds: &[(&Changed, Arc<DeltaCdfTableProvider>)],
    skip: Option<&str>,
    recompute: &mut ScalarSet,
    removed: &mut ScalarSet,
) -> Result<(), DeriveError> {
    for (c, cdf) in feeds.iter().filter(|(c, _)| Some(c.name.as_str()) != skip) {
        let clock = std::time::Instant::now();
        let changes = rules_changes(shared, ctx, c, cdf).await?;
        let read = clock.elapsed();
        ctx.register_table("changes", changes).map_err(df_err("registering the change feed"))?;
        let mut result = Ok(());
        for (kind, rules, into) in
            [("affects", &inc.affects, &mut *recompute), ("removes", &inc.removes, &mut *removed)]
        {
            let Some(rule) = rules.get(&c.name) else { continue };
            let rule_clock = std::time::Instant::now();
            let what = || format!("{out}: the rule for {}", c.name);
            let batches = match ctx.sql(rule).await {
                Ok(df) => df.collect().await.map_err(df_err(what())),
                Err(e) => Err(df_err(what())(e)),
            };
            match batches {
                Ok(batches) => {
                    for b in &batches {
                        add_keys(into, b.column(0))?;
                    }
                    tracing::trace!(
                        table = out,
                        input = c.name.as_str(),
                        rule = kind,
                        keys = batches.iter().map(RecordBatch::num_rows).sum::<usize>(),
                        seconds = rule_clock.elapsed().as_secs_f64(),
                        "derive: rule"
                    );
                }
                Err(e) => result = Err(e),
            }
        }
        ctx.deregister_table("changes").map_err(df_err("deregistering"))?;
        result?;
        tracing::debug!(
            table = out,
            input = c.name.as_str(),
            feed_seconds = read.as_secs_f64(),
            seconds = clock.elapsed().as_secs_f64(),
            "derive: rules run"
        );
    }
    Ok(())
}

/// Rows per file of the tables stored by key (the marts): one lookup page, so a lookup that
/// file skipping leaves one file for decodes one page per column, deletion vectors or not.
pub const KEY_RANGE_FILE_ROWS: usize = crate::run::LOOKUP_PAGE_ROWS;

#[allow(clippy::too_many_arguments)]
pub async fn attempt(
    lake: &Lake,
    session: &LakeSession,
    job: &Job,
    inc: &Incremental,
    make: Option<(&str, i64)>,
    partition: Option<i64>,
    out: &str,
    table: DeltaTable,
    previous: &Value,
    state: &Value,
    recorded: &Value,
    as_of_micros: i64,
    shared: &Shared,
) -> Result<Attempt, DeriveError> {
    use Attempt::NotApplicable as Na;
    if previous.get("definition") != state.get("definition") {
        return Ok(Na("its definition changed".into()));
    }
    let as_of_moved = previous.get("as_of_micros") != state.get("as_of_micros");
    if as_of_moved {
        let day = |v: &Value| v.get("as_of_micros").and_then(Value::as_i64).map(|m| m.div_euclid(86_400_000_000));
        if !job.reads_as_of_date_only() || day(previous).is_none() || day(previous) != day(state) {
            return Ok(Na("the as-of changed".into()));
        }
    }
    let (Some(before), Some(now)) =
        (previous.get("inputs").and_then(Value::as_object), state.get("inputs").and_then(Value::as_object))
    else {
        return Ok(Na("no recorded inputs".into()));
    };
    let mut tables = std::collections::BTreeMap::new();
    if let Err(why) = changed_tables(before, now, &mut tables) {
        return Ok(Na(why));
    }
    let mut changed = Vec::new();
    for (name, (from, to)) in tables {
        let named =
            inc.fold.as_ref() == Some(&name) || inc.affects.contains_key(&name) || inc.removes.contains_key(&name);
        if !named {
            return Ok(Na(format!("{name} changed and the job has no incremental rule for it")));
        }
        changed.push(Changed { name, from, to });
    }
    let rel = out.replace('.', "/");
    if changed.is_empty() {
        if !as_of_moved {
            return Ok(Na("no input changed".into()));
        }
        // The as-of moved within its day: the same table, recorded as built as of now.
        let version =
            weir_lake::commit_metadata(&table, &rel, state_metadata(job, recorded, json!({ "inputs": [] }))).await?;
        return Ok(Attempt::Done(IncrementalReport { version, ..Default::default() }));
    }

    // Every changed input: a change feed, and only CDC commits (bronze) or incremental
    // derive commits (silver) in the range.
    let mut feeds = Vec::new();
    for c in &changed {
        let id = (c.name.clone(), c.from, c.to);
        let cached = shared.feeds.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned();
        let feed = match cached {
            Some(f) => f,
            None => {
                let f = change_feed(lake, session.table_at(lake, &c.name, c.to).await?, c).await?;
                shared.feeds.lock().unwrap_or_else(|p| p.into_inner()).insert(id, f.clone());
                f
            }
        };
        match feed {
            Ok(cdf) => feeds.push((c, cdf)),
            Err(why) => return Ok(Na(why)),
        }
    }
    let inputs: Vec<String> = changed.iter().map(|c| format!("{} v{} → v{}", c.name, c.from, c.to)).collect();
    let Some(fold) = inc.fold.as_deref() else {
        let unit = (make, partition, out);
        return recompute(lake, session, job, inc, unit, table, &feeds, inputs, recorded, as_of_micros, shared)
            .await
            .map(Attempt::Done);
    };
    let merge_sql = inc.merge.clone().unwrap_or_default();

    let ctx = &session.ctx;
    let key = &job.key[0];
    let mut phases = Vec::new();
    let mut clock = std::time::Instant::now();
    macro_rules! lap {
        ($name:expr) => {{
            phases.push(($name, clock.elapsed()));
            clock = std::time::Instant::now();
        }};
    }
    let fold_provider = ctx.table_provider(fold).await.map_err(df_err(format!("reading {fold}")))?;
    let fold_schema = fold_provider.schema();
    let quoted: Vec<String> = fold_schema.fields().iter().map(|f| format!("\"{}\"", f.name())).collect();
    let mut recompute: ScalarSet = ScalarSet::default();
    let collect = |sql: String| async move {
        ctx.sql(&sql)
            .await
            .map_err(df_err(format!("{out}: {sql}")))?
            .collect()
            .await
            .map_err(df_err(format!("{out}: running {sql}")))
    };

    // The fold source: its inserted rows, and the keys of its deleted or updated rows.
    let new_sql = format!("SELECT {} FROM weir_fold_changes WHERE _change_type = 'insert'", quoted.join(", "));
    let mut new_rows = 0u64;
    let new_table = match feeds.iter().find(|(c, _)| c.name == fold) {
        Some((_, cdf)) => {
            ctx.register_table("weir_fold_changes", cdf.clone()).map_err(df_err("registering the change feed"))?;
            let df = ctx.sql(&new_sql).await.map_err(df_err(format!("{out}: {new_sql}")))?;
            let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
            let batches = df.collect().await.map_err(df_err(format!("{out}: reading new rows")))?;
            new_rows = batches.iter().map(|b| b.num_rows() as u64).sum();
            for b in collect(format!("SELECT DISTINCT \"{key}\" FROM weir_fold_changes WHERE _change_type <> 'insert'"))
                .await?
            {
                add_keys(&mut recompute, b.column(0))?;
            }
            ctx.deregister_table("weir_fold_changes").map_err(df_err("deregistering"))?;
            MemTable::try_new(schema, vec![batches]).map_err(df_err("new rows"))?
        }
        None => MemTable::try_new(fold_schema.clone(), vec![vec![]]).map_err(df_err("new rows"))?,
    };
    ctx.register_table("new_rows", Arc::new(new_table)).map_err(df_err("registering new_rows"))?;
    lap!("change feeds");

    // The other inputs: each rule's keys to recompute, and to remove. Rules may read the
    // stored table as `current`.
    let current = ctx.table_provider(out).await.map_err(df_err(format!("reading {out}")))?;
    ctx.register_table("current", in_partition_view(session, current, partition, out)?)
        .map_err(df_err("registering current"))?;
    let mut removed: ScalarSet = ScalarSet::default();
    run_rules(ctx, shared, inc, out, &feeds, Some(fold), &mut recompute, &mut removed).await?;
    let keys: Vec<ScalarValue> = recompute.into_iter().filter(|k| !k.is_null() && !removed.contains(k)).collect();
    let removed: Vec<ScalarValue> = removed.into_iter().filter(|k| !k.is_null()).collect();
    lap!("rules");

    // delta: the job over the new rows whose keys are not recomputed.
    let restore = |p| session.replace(fold, p);
    let mut new_view = ctx.table("new_rows").await.map_err(df_err("new_rows"))?;
    if !keys.is_empty() || !removed.is_empty() {
        let ks: Vec<_> = keys.iter().chain(&removed).map(|k| lit(k.clone())).collect();
        new_view = new_view.filter(in_list(col(key.as_str()), ks, true)).map_err(df_err("filtering new rows"))?;
    }
    session.replace(fold, new_view.into_view())?;
    let sql = job.expand(None, as_of_micros);
    let delta = collect(sql.clone()).await;
    restore(fold_provider.clone())?;
    let delta = delta?;
    let delta_schema: SchemaRef = match delta.first() {
        Some(b) => b.schema(),
        None => Arc::new(ctx.sql(&sql).await.map_err(df_err(out.to_string()))?.schema().as_arrow().clone()),
    };
    ctx.register_table("delta", Arc::new(MemTable::try_new(delta_schema, vec![delta]).map_err(df_err("delta"))?))
        .map_err(df_err("registering delta"))?;
    let merged = collect(merge_sql).await;
    for t in ["delta", "current", "new_rows"] {
        ctx.deregister_table(t).map_err(df_err("deregistering"))?;
    }
    let merged = merged?;
    lap!("fold + merge SQL");

    // Keys recomputed from their history (the fold source restricted to them).
    let mut recomputed = Vec::new();
    if !keys.is_empty() {
        let ks: Vec<_> = keys.iter().map(|k| lit(k.clone())).collect();
        let filtered = ctx
            .read_table(fold_provider.clone())
            .and_then(|df| df.filter(in_list(col(key.as_str()), ks, false)))
            .map_err(df_err("restricting the fold source"))?;
        session.replace(fold, filtered.into_view())?;
        let r = collect(sql.clone()).await;
        restore(fold_provider.clone())?;
        recomputed = r?;
    }
    lap!("recompute");
    // One partition alone: the rows outside it are not written, and their keys are deleted
    // from it (a listing that left the make).
    let mut outside: Vec<ScalarValue> = Vec::new();
    let (merged, recomputed) = match partition {
        Some(id) => (
            split_partition(merged, id, key, out, &mut outside)?,
            split_partition(recomputed, id, key, out, &mut outside)?,
        ),
        None => (merged, recomputed),
    };

    // One commit by key: upserts from both, deletes for recomputed keys without a row.
    let mut found: ScalarSet = ScalarSet::default();
    for b in &recomputed {
        add_keys(&mut found, b.column_by_name(key).ok_or_else(|| missing(out, key))?)?;
    }
    let merged_keys: u64 = merged.iter().map(|b| b.num_rows() as u64).sum();
    let mut gone: Vec<ScalarValue> = keys.iter().filter(|k| !found.contains(*k)).chain(&removed).cloned().collect();
    // A recomputed key whose row is outside the partition is not found, so listed already.
    let listed: ScalarSet = gone.iter().cloned().collect();
    gone.extend(outside.into_iter().filter(|k| !listed.contains(k)));
    let upserts: Vec<RecordBatch> = merged.into_iter().chain(recomputed).collect();
    let summary = |phases: &[(&str, std::time::Duration)]| {
        json!({
            "new_rows": new_rows, "merged": merged_keys, "recomputed": keys.len(), "deleted": gone.len(), "inputs": inputs,
            "phases_ms": phases_json(phases),
        })
    };
    let gone_keys = match gone.is_empty() {
        true => None,
        false => Some(ScalarValue::iter_to_array(gone.iter().cloned()).map_err(df_err("building delete keys"))?),
    };
    let layout = merge_layout(job, &table, out)?;
    let confine = partition.map(|id| weir_lake::KeyScope::default().within(MAKE_ID, id.to_string()));
    let (version, stats) =
        store_changes(lake, job, out, table, &upserts, gone_keys, confine.as_ref(), layout, recorded, summary(&phases))
            .await?;
    phases.push(("Delta commit", clock.elapsed()));
    Ok(Attempt::Done(IncrementalReport {
        version,
        new_rows,
        merged: merged_keys,
        recomputed: keys.len() as u64,
        deleted: stats.deleted,
        inputs,
        phases,
    }))
}

fn phases_json(phases: &[(&str, std::time::Duration)]) -> serde_json::Map<String, Value> {
    phases.iter().map(|(n, d)| (n.to_string(), json!(d.as_millis() as u64))).collect()
}

/// The commit metadata of an incremental update: the state it brings the table to.
fn state_metadata(job: &Job, recorded: &Value, summary: Value) -> std::collections::HashMap<String, Value> {
    std::collections::HashMap::from([
        (crate::run::STATE_KEY.to_string(), Value::String(recorded.to_string())),
        ("weir.derive.key".to_string(), json!(job.key)),
        ("weir.derive.incremental".to_string(), summary),
    ])
}

/// Writes the new rows of `upserts` and deletes `gone` in one commit, a Delta merge by key
/// on read (deletion vectors). A key-ranged table (a mart's stored rows, see
/// [`Job::key_ranged`]) keeps its layout for lookups: new rows sorted by key in files of at
/// most [`KEY_RANGE_FILE_ROWS`] rows with the lookup page layout, and no change data feed
/// (nothing reads a mart's changes; its replaced rows are then not even read). Other tables
/// get their change data feed, for the jobs that read them.
#[allow(clippy::too_many_arguments)]
async fn store_changes(
    lake: &Lake,
    job: &Job,
    out: &str,
    table: DeltaTable,
    upserts: &[RecordBatch],
    gone: Option<ArrayRef>,
    scope: Option<&weir_lake::KeyScope>,
    (layout, writer): (weir_lake::MergeLayout, WriterProperties),
    recorded: &Value,
    summary: Value,
) -> Result<(i64, weir_lake::MergeStats), DeriveError> {
    let key = &job.key[0];
    let rel = out.replace('.', "/");
    let err = |m: String| DeriveError::Write { table: out.to_string(), message: m };
    let target: SchemaRef = table.snapshot().map_err(|e| err(e.to_string()))?.snapshot().arrow_schema();
    let mut parts = Vec::new();
    for b in upserts {
        parts.push(with_op(&target, b, "U", out)?);
    }
    if let Some(gone) = gone.filter(|g| !g.is_empty()) {
        parts.push(deletes(&target, key, &gone, out)?);
    }
    let schema = match parts.first() {
        Some(p) => p.schema(),
        None => with_op(&target, &RecordBatch::new_empty(target.clone()), "U", out)?.schema(),
    };
    let source = arrow::compute::concat_batches(&schema, &parts).map_err(|e| err(e.to_string()))?;
    let props = CommitProperties::default().with_metadata(state_metadata(job, recorded, summary));
    let (table, stats) =
        weir_lake::merge_by_key(lake, table, &rel, source, std::slice::from_ref(key), writer, props, layout, scope)
            .await?;
    Ok((table.version().map_or(0, |v| v as i64), stats))
}

/// How `job`'s merges into `table` lay out their files: a key-ranged table (see
/// [`Job::key_ranged`]) with one integer key keeps its layout for lookups and has no change
/// data feed; other tables get one, for the jobs that read them.
fn merge_layout(
    job: &Job,
    table: &DeltaTable,
    out: &str,
) -> Result<(weir_lake::MergeLayout, WriterProperties), DeriveError> {
    let err = |m: String| DeriveError::Write { table: out.to_string(), message: m };
    let target: SchemaRef = table.snapshot().map_err(|e| err(e.to_string()))?.snapshot().arrow_schema();
    let integer_key = target.field_with_name(&job.key[0]).is_ok_and(|f| f.data_type().is_integer());
    Ok(if job.key_ranged() && integer_key && job.key.len() == 1 {
        let layout = weir_lake::MergeLayout { key_files: Some(KEY_RANGE_FILE_ROWS), no_change_data: true };
        (layout, crate::run::lookup_writer_properties())
    } else {
        (weir_lake::MergeLayout::default(), crate::run::writer_properties())
    })
}

/// A job without a fold: the keys its rules find are recomputed by the job's SQL, with its
/// `keyed` sources restricted to them; keys that produce no row are deleted. `unit`: the
/// make of a per-make job, the `make_id` partition to keep alone, the output.
#[allow(clippy::too_many_arguments)]
async fn recompute(
    lake: &Lake,
    session: &LakeSession,
    job: &Job,
    inc: &Incremental,
    (make, partition, out): (Option<(&str, i64)>, Option<i64>, &str),
    table: DeltaTable,
    feeds: &[(&Changed, Arc<DeltaCdfTableProvider>)],
    inputs: Vec<String>,
    recorded: &Value,
    as_of_micros: i64,
    shared: &Shared,
) -> Result<IncrementalReport, DeriveError> {
    let ctx = &session.ctx;
    let key = &job.key[0];
    let mut phases = Vec::new();
    let mut clock = std::time::Instant::now();
    let current = ctx.table_provider(out).await.map_err(df_err(format!("reading {out}")))?;
    let current = in_partition_view(session, current, partition, out)?;
    let key_type = current.schema().field_with_name(key).map_err(|_| missing(out, key))?.data_type().clone();
    let collect = |df: datafusion::dataframe::DataFrame, what: String| async move {
        df.collect().await.map_err(df_err(format!("{out}: {what}")))
    };

    // The keys: rules that do not read `current` give the same keys to every unit reading
    // the same changes (every make's mart), so they run once per derive run.
    let reads_current = rules_read_current(inc);
    let signature = format!("{}:{}", job.name, inputs.join(","));
    // Rules register `changes` and `current` in the session: one unit at a time (units run
    // on two threads), and a unit that waited finds the keys another computed meanwhile.
    let rules_guard = shared.rules.lock().await;
    let cached = if reads_current { None } else { shared.cached_keys(&signature) };
    let affected = match cached {
        Some(k) => k,
        None => {
            ctx.register_table("current", current.clone()).map_err(df_err("registering current"))?;
            let mut recompute: ScalarSet = ScalarSet::default();
            let mut removed: ScalarSet = ScalarSet::default();
            let result = run_rules(ctx, shared, inc, out, feeds, None, &mut recompute, &mut removed).await;
            ctx.deregister_table("current").map_err(df_err("deregistering"))?;
            result?;
            let keys: Vec<ScalarValue> =
                recompute.into_iter().filter(|k| !k.is_null() && !removed.contains(k)).collect();
            let removed: Vec<ScalarValue> = removed.into_iter().filter(|k| !k.is_null()).collect();
            let as_batch = |values: &[ScalarValue]| -> Result<RecordBatch, DeriveError> {
                let array = if values.is_empty() {
                    new_null_array(&key_type, 0)
                } else {
                    let a = ScalarValue::iter_to_array(values.iter().cloned()).map_err(df_err("building keys"))?;
                    arrow::compute::cast(&a, &key_type).map_err(|e| df_err("building keys")(e.into()))?
                };
                let schema = Arc::new(Schema::new(vec![Field::new("__weir_key", key_type.clone(), true)]));
                RecordBatch::try_new(schema, vec![array]).map_err(|e| df_err("building keys")(e.into()))
            };
            let key_set = KeySet::of_values(&keys);
            let all: Vec<ScalarValue> = keys.iter().chain(&removed).cloned().collect();
            let all_set = KeySet::of_values(&all);
            let scope = KeySet::ints(&all).map(weir_lake::KeyScope::new);
            let k =
                AffectedKeys { keys: as_batch(&keys)?, key_set: Arc::new(key_set), all_set: Arc::new(all_set), scope };
            if !reads_current {
                shared.keys.lock().unwrap_or_else(|p| p.into_inner()).insert(signature.clone(), k.clone());
            }
            k
        }
    };
    let AffectedKeys { keys, key_set, all_set, scope } = affected;
    phases.push(("rules", clock.elapsed()));
    clock = std::time::Instant::now();

    let mut rows = Vec::new();
    if keys.num_rows() > 0 {
        // The job's SQL in a context where its keyed sources hold the affected keys' rows
        // only and its small sources are read once (built once per run for every unit with
        // the same changes; the rules lock is held so that the others wait for it).
        let cached = if reads_current { None } else { shared.cached_fork(&signature) };
        let fork = match cached {
            Some(f) => f,
            None => {
                let f = fork(lake, session, job, inc, &keys, key).await?;
                if !reads_current {
                    shared.forks.lock().unwrap_or_else(|p| p.into_inner()).insert(signature.clone(), f.clone());
                }
                f
            }
        };
        drop(rules_guard);
        let sql = job.expand(make, as_of_micros);
        // Each shard's SQL in a task of its own: the runtime's threads run them side by side.
        let shards = fork.len();
        let tasks: Vec<_> = fork
            .into_iter()
            .map(|ctx| {
                let sql = sql.clone();
                tokio::spawn(async move { ctx.sql(&sql).await?.collect().await })
            })
            .collect();
        for (shard, task) in tasks.into_iter().enumerate() {
            let batches = task
                .await
                .map_err(|e| DeriveError::Write {
                    table: out.to_string(),
                    message: format!("recomputing failed: {e}"),
                })?
                .map_err(df_err(format!("{out}: {sql}")))?;
            // Only the affected keys' rows (a key from a source that is not restricted may
            // bring others), filtered here: one hash set for every mart, not a join's table
            // each; and of a shard, only its own keys' rows.
            for b in batches {
                let col = b.column_by_name(key).ok_or_else(|| missing(out, key))?;
                let mut mask = key_set.members(col)?;
                if shards > 1 {
                    let of = shard_of(col, shards).map_err(|e| df_err("sharding the result")(e.into()))?;
                    mask.iter_mut().zip(of).for_each(|(m, s)| *m &= s == shard);
                }
                let b = arrow::compute::filter_record_batch(&b, &mask.into())
                    .map_err(|e| df_err("restricting the result")(e.into()))?;
                // One partition alone: a key whose row left it is deleted from it (it is
                // affected, and now without a row there).
                let b = match partition {
                    Some(id) => in_partition(&b, id, out)?.0,
                    None => b,
                };
                if b.num_rows() > 0 {
                    rows.push(b);
                }
            }
        }
    } else {
        drop(rules_guard);
    }
    phases.push(("recompute", clock.elapsed()));
    clock = std::time::Instant::now();

    // Keys without a row now go, if the table has them. A table without a change data feed
    // keyed by an integer: its merge deletes them, in its own pass over the key column (the
    // affected keys are its scope). Else: its keys read (one column), the affected ones
    // without a recomputed row handed to the merge as deletes. (Handing it every affected key
    // as a delete costs more: a mart's merge then indexes every make's affected keys.)
    let (layout, writer) = merge_layout(job, &table, out)?;
    let scope = scope.filter(|_| layout.no_change_data);
    // One partition alone: the merge reads, replaces and deletes rows of it only.
    let confined = match partition {
        Some(id) => Some(scope.clone().unwrap_or_default().within(MAKE_ID, id.to_string())),
        None => scope.clone(),
    };
    let found_keys: Vec<&ArrayRef> =
        rows.iter().map(|b| b.column_by_name(key).ok_or_else(|| missing(out, key))).collect::<Result<_, _>>()?;
    let found = KeySet::of_arrays(&found_keys)?;
    let mut gone: Vec<ArrayRef> = Vec::new();
    if !all_set.is_empty() && scope.is_none() {
        let df = ctx
            .read_table(current)
            .and_then(|d| d.select(vec![col(key.as_str())]))
            .map_err(df_err(format!("{out}: finding the rows to delete")))?;
        for b in collect(df, "finding the rows to delete".into()).await? {
            let (affected, recomputed) = (all_set.members(b.column(0))?, found.members(b.column(0))?);
            let mask: arrow::array::BooleanArray =
                affected.iter().zip(&recomputed).map(|(a, r)| Some(*a && !*r)).collect();
            let keys = arrow::compute::filter(b.column(0), &mask).map_err(|e| df_err("reading keys")(e.into()))?;
            if !keys.is_empty() {
                gone.push(keys);
            }
        }
    }
    let gone = match gone.is_empty() {
        true => None,
        false => {
            let parts: Vec<&dyn arrow::array::Array> = gone.iter().map(|a| a.as_ref()).collect();
            Some(arrow::compute::concat(&parts).map_err(|e| df_err("reading keys")(e.into()))?)
        }
    };
    let found_deleted = gone.as_ref().map_or(0, |g| g.len()) as u64;
    if scope.is_none() {
        phases.push(("deletes", clock.elapsed()));
        clock = std::time::Instant::now();
    }
    let recomputed: u64 = rows.iter().map(|b| b.num_rows() as u64).sum();
    let mut summary = json!({
        "recomputed": recomputed, "affected_keys": keys.num_rows(), "inputs": inputs,
        "phases_ms": phases_json(&phases),
    });
    // Rows deleted by the merge's key scope are counted by the merge, after this summary.
    if scope.is_none() {
        summary["deleted"] = json!(found_deleted);
    }
    let (version, deleted) = if rows.is_empty() && gone.is_none() && scope.is_none() {
        // Nothing of this table changed: only the state it is now built from.
        let rel = out.replace('.', "/");
        (weir_lake::commit_metadata(&table, &rel, state_metadata(job, recorded, summary)).await?, 0)
    } else {
        let stored =
            store_changes(lake, job, out, table, &rows, gone, confined.as_ref(), (layout, writer), recorded, summary);
        let (version, stats) = stored.await?;
        (version, if scope.is_some() { stats.deleted } else { found_deleted })
    };
    phases.push(("Delta commit", clock.elapsed()));
    Ok(IncrementalReport { version, new_rows: 0, merged: 0, recomputed, deleted, inputs, phases })
}

/// Sources of at most this many rows that a job does not restrict to the affected keys are
/// read once into memory for every unit sharing a fork (a mart's sellers and makes).
const SMALL_SOURCE_ROWS: usize = 1 << 18;

/// Shards a no-fold job's recompute is cut into when it has keyed sources and an integer key:
/// each shard's SQL runs on one partition over the keys `key % SHARDS` picks, the shards at
/// the same time. (One plan on two partitions repartitioned every restricted row by key,
/// which cost more than the joins; the keyed rows of a key are all in one shard.)
const SHARDS: usize = 2;

/// Contexts for `job`'s SQL over the affected `keys` (a one-column batch, `__weir_key`): its
/// keyed sources hold those keys' rows only, its other sources of at most
/// [`SMALL_SOURCE_ROWS`] rows are in memory; every source is read at the same time. One
/// context, or one per shard (see [`SHARDS`]), each holding the keyed rows of its shard's
/// keys.
async fn fork(
    lake: &Lake,
    session: &LakeSession,
    job: &Job,
    inc: &Incremental,
    keys: &RecordBatch,
    key: &str,
) -> Result<Vec<datafusion::prelude::SessionContext>, DeriveError> {
    let integer_key = keys.column(0).data_type().is_integer();
    // Integer keys: a stored source's rows are read by key.
    let by_key = match integer_key {
        true => {
            let ints =
                arrow::compute::cast(keys.column(0), &DataType::Int64).map_err(|e| df_err("reading keys")(e.into()))?;
            // A NULL key matches no row, as in the join it stands for.
            let ints = arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(&ints);
            Some(weir_lake::KeyScope::new(ints.iter().flatten()))
        }
        false => None,
    };
    let read: Vec<ForkSource> = futures::future::try_join_all(
        job.sources.iter().map(|s| fork_source(lake, session, inc, (keys, by_key.as_ref()), key, s)),
    )
    .await?
    .into_iter()
    .flatten()
    .collect();
    let what = |w: &str, src: &str| format!("{w} {src}");
    if job.per.is_some() {
        // A per-make job's keyed rows split by make: each make's SQL, which filters them by
        // its make_id, reads its own. Its units run side by side, each on one partition.
        use crate::split::SplitTable;
        let mut overrides = Vec::new();
        for f in read {
            let p: Arc<dyn datafusion::catalog::TableProvider> =
                match f.keyed && SplitTable::splits(&f.schema, crate::run::MAKE_ID) {
                    true => Arc::new(
                        SplitTable::try_new(f.schema, f.batches, crate::run::MAKE_ID)
                            .map_err(df_err(what("splitting", &f.name)))?,
                    ),
                    false => Arc::new(
                        MemTable::try_new(f.schema, vec![f.batches]).map_err(df_err(what("reading", &f.name)))?,
                    ),
                };
            overrides.push((f.name, p));
        }
        return Ok(vec![session.fork_with(&overrides, Some(1)).await?]);
    }
    let shards = if integer_key && read.iter().any(|f| f.keyed) && keys.num_rows() > 1 { SHARDS } else { 1 };
    let mut per_shard: Vec<Vec<(String, Arc<dyn datafusion::catalog::TableProvider>)>> = vec![Vec::new(); shards];
    for f in read {
        if f.keyed && shards > 1 {
            let parts =
                shard_batches(&f.batches, key, shards).map_err(|e| df_err(what("sharding", &f.name))(e.into()))?;
            for (i, batches) in parts.into_iter().enumerate() {
                let t =
                    MemTable::try_new(f.schema.clone(), vec![batches]).map_err(df_err(what("sharding", &f.name)))?;
                per_shard[i].push((f.name.clone(), Arc::new(t)));
            }
        } else {
            let t: Arc<dyn datafusion::catalog::TableProvider> =
                Arc::new(MemTable::try_new(f.schema, vec![f.batches]).map_err(df_err(what("reading", &f.name)))?);
            for o in &mut per_shard {
                o.push((f.name.clone(), t.clone()));
            }
        }
    }
    let partitions = (shards > 1).then_some(1);
    let mut forks = Vec::new();
    for overrides in &per_shard {
        forks.push(session.fork_with(overrides, partitions).await?);
    }
    Ok(forks)
}

/// A source of a [`fork`] as read: the keyed ones restricted to the keys, a small one whole.
struct ForkSource {
    name: String,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    keyed: bool,
}

/// Which of `shards` shards each value of an integer key column is in (`key % shards`, NULL
/// in the first).
pub(crate) fn shard_of(keys: &ArrayRef, shards: usize) -> Result<Vec<usize>, arrow::error::ArrowError> {
    let ints = arrow::compute::cast(keys, &DataType::Int64)?;
    let ints = arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(&ints);
    Ok(ints.iter().map(|k| k.map_or(0, |k| k.rem_euclid(shards as i64) as usize)).collect())
}

/// `batches` split by the shard of their `key` column (see [`shard_of`]).
fn shard_batches(
    batches: &[RecordBatch],
    key: &str,
    shards: usize,
) -> Result<Vec<Vec<RecordBatch>>, arrow::error::ArrowError> {
    let mut out = vec![Vec::new(); shards];
    for b in batches {
        let col = b
            .column_by_name(key)
            .ok_or_else(|| arrow::error::ArrowError::SchemaError(format!("no key column {key}")))?;
        let of = shard_of(col, shards)?;
        for (i, part) in out.iter_mut().enumerate() {
            let mask: arrow::array::BooleanArray = of.iter().map(|s| Some(*s == i)).collect();
            let rows = arrow::compute::filter_record_batch(b, &mask)?;
            if rows.num_rows() > 0 {
                part.push(rows);
            }
        }
    }
    Ok(out)
}

/// One source of a [`fork`]: the keyed ones restricted to `keys`, a small one read whole,
/// None for one read as it is.
async fn fork_source(
    lake: &Lake,
    session: &LakeSession,
    inc: &Incremental,
    (keys, by_key): (&RecordBatch, Option<&weir_lake::KeyScope>),
    key: &str,
    src: &String,
) -> Result<Option<ForkSource>, DeriveError> {
    let ctx = &session.ctx;
    let clock = std::time::Instant::now();
    let what = |w: &str| format!("{w} {src}");
    let keyed = inc.keyed.contains(src);
    // A source the session does not hold under its name (a per-make job's own make's
    // table) is read as the unit's SQL names it.
    if !keyed && !ctx.table_exist(src.as_str()).map_err(df_err(what("reading")))? {
        return Ok(None);
    }
    let df = ctx.table(src.as_str()).await.map_err(df_err(what("reading")))?;
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    if let (true, Some(scope)) = (keyed, by_key) {
        // The keys' rows straight from the stored table behind the source (see crate::keyed).
        if let Some(batches) = crate::keyed::rows_by_key(lake, session, src, key, scope, &schema).await? {
            let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
            let seconds = clock.elapsed().as_secs_f64();
            tracing::debug!(source = src.as_str(), keyed, rows, seconds, "derive: fork source read by key");
            return Ok(Some(ForkSource { name: src.clone(), schema, batches, keyed }));
        }
    }
    let df = if keyed {
        let right = ctx.read_batch(keys.clone()).map_err(df_err(what("restricting")))?;
        df.join(right, datafusion::common::JoinType::LeftSemi, &[key], &["__weir_key"], None)
    } else {
        df.limit(0, Some(SMALL_SOURCE_ROWS + 1))
    }
    .map_err(df_err(what("restricting")))?;
    let batches = df.collect().await.map_err(df_err(what("reading")))?;
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    tracing::debug!(source = src.as_str(), keyed, rows, seconds = clock.elapsed().as_secs_f64(), "derive: fork source");
    if !keyed && rows > SMALL_SOURCE_ROWS {
        return Ok(None);
    }
    Ok(Some(ForkSource { name: src.clone(), schema, batches, keyed }))
}

/// The rows of `b` in the `make_id` partition `id`, and those outside it.
fn in_partition(b: &RecordBatch, id: i64, out: &str) -> Result<(RecordBatch, RecordBatch), DeriveError> {
    let err = |e: arrow::error::ArrowError| df_err(format!("{out}: keeping {MAKE_ID}={id}"))(e.into());
    let c = b.column_by_name(MAKE_ID).ok_or_else(|| missing(out, MAKE_ID))?;
    let c = arrow::compute::cast(c, &DataType::Int64).map_err(err)?;
    let inside = arrow::compute::kernels::cmp::eq(&c, &arrow::array::Int64Array::new_scalar(id)).map_err(err)?;
    let outside = arrow::compute::not(&inside).map_err(err)?;
    Ok((
        arrow::compute::filter_record_batch(b, &inside).map_err(err)?,
        arrow::compute::filter_record_batch(b, &outside).map_err(err)?,
    ))
}

/// The rows of `batches` in the `make_id` partition `id`; the keys of the others go to
/// `outside`.
fn split_partition(
    batches: Vec<RecordBatch>,
    id: i64,
    key: &str,
    out: &str,
    outside: &mut Vec<ScalarValue>,
) -> Result<Vec<RecordBatch>, DeriveError> {
    let mut kept = Vec::with_capacity(batches.len());
    for b in batches {
        let (inside, other) = in_partition(&b, id, out)?;
        let keys = other.column_by_name(key).ok_or_else(|| missing(out, key))?;
        for i in 0..keys.len() {
            outside.push(ScalarValue::try_from_array(keys, i).map_err(df_err("reading keys"))?);
        }
        kept.push(inside);
    }
    Ok(kept)
}

/// The stored table as the unit sees it: one `make_id` partition of it when it keeps that one
/// alone (another partition may hold an older row of the same key).
fn in_partition_view(
    session: &LakeSession,
    current: Arc<dyn datafusion::catalog::TableProvider>,
    partition: Option<i64>,
    out: &str,
) -> Result<Arc<dyn datafusion::catalog::TableProvider>, DeriveError> {
    let Some(id) = partition else { return Ok(current) };
    let df = session.ctx.read_table(current).and_then(|df| df.filter(col(MAKE_ID).eq(lit(id))));
    Ok(df.map_err(df_err(format!("{out}: {MAKE_ID}={id}")))?.into_view())
}

fn missing(out: &str, key: &str) -> DeriveError {
    DeriveError::Write { table: out.to_string(), message: format!("the job's result has no key column {key}") }
}

fn add_keys(set: &mut ScalarSet, a: &ArrayRef) -> Result<(), DeriveError> {
    // BIGINT keys (every job's so far) read as integers, not one downcast per value.
    if let Some(ints) = a.as_any().downcast_ref::<arrow::array::Int64Array>() {
        set.extend(ints.iter().map(ScalarValue::Int64));
        return Ok(());
    }
    for i in 0..a.len() {
        set.insert(ScalarValue::try_from_array(a, i).map_err(df_err("reading keys"))?);
    }
    Ok(())
}

/// `b`'s columns in the table's order and types, plus the merge operation column.
fn with_op(target: &SchemaRef, b: &RecordBatch, op: &str, out: &str) -> Result<RecordBatch, DeriveError> {
    let err = |m: String| DeriveError::Write { table: out.to_string(), message: m };
    let mut fields: Vec<Field> = Vec::new();
    let mut cols: Vec<ArrayRef> = Vec::new();
    for f in target.fields() {
        let c = b
            .column_by_name(f.name())
            .ok_or_else(|| err(format!("the incremental result has no column {}", f.name())))?;
        let c = if c.data_type() == f.data_type() {
            c.clone()
        } else {
            arrow::compute::cast(c, f.data_type()).map_err(|e| err(e.to_string()))?
        };
        fields.push(Field::new(f.name(), f.data_type().clone(), true));
        cols.push(c);
    }
    fields.push(Field::new(weir_lake::OP_COLUMN, DataType::Utf8, false));
    cols.push(Arc::new(StringArray::from(vec![op; b.num_rows()])));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(|e| err(e.to_string()))
}

/// Delete rows for `keys`: the key set, every other column NULL.
fn deletes(target: &SchemaRef, key: &str, keys: &ArrayRef, out: &str) -> Result<RecordBatch, DeriveError> {
    let err = |m: String| DeriveError::Write { table: out.to_string(), message: m };
    let mut cols: Vec<ArrayRef> = Vec::new();
    for f in target.fields() {
        cols.push(if f.name() == key {
            if keys.data_type() == f.data_type() {
                keys.clone()
            } else {
                arrow::compute::cast(keys, f.data_type()).map_err(|e| err(e.to_string()))?
            }
        } else {
            new_null_array(f.data_type(), keys.len())
        });
    }
    let nullable: Vec<Field> =
        target.fields().iter().map(|f| Field::new(f.name(), f.data_type().clone(), true)).collect();
    let b = RecordBatch::try_new(Arc::new(Schema::new(nullable)), cols).map_err(|e| err(e.to_string()))?;
    let b = with_op(&b.schema(), &b, "D", out)?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_rows_by_key_and_keep_every_row_once() {
        let keys: ArrayRef = Arc::new(arrow::array::Int32Array::from(vec![Some(-3), Some(0), Some(1), Some(2), None]));
        assert_eq!(shard_of(&keys, 2).unwrap(), [1, 0, 1, 0, 0]);
        let schema =
            Arc::new(Schema::new(vec![Field::new("id", DataType::Int32, true), Field::new("v", DataType::Utf8, true)]));
        let values: ArrayRef = Arc::new(StringArray::from(vec!["a", "b", "c", "d", "e"]));
        let batch = RecordBatch::try_new(schema, vec![keys, values]).unwrap();
        let parts = shard_batches(&[batch.clone(), batch], "id", 2).unwrap();
        let ids = |p: &[RecordBatch]| -> Vec<Option<i32>> {
            p.iter()
                .flat_map(|b| arrow::array::AsArray::as_primitive::<arrow::datatypes::Int32Type>(b.column(0)).iter())
                .collect()
        };
        assert_eq!(ids(&parts[0]), [Some(0), Some(2), None, Some(0), Some(2), None]);
        assert_eq!(ids(&parts[1]), [Some(-3), Some(1), Some(-3), Some(1)]);
        assert!(shard_batches(&parts[0], "nope", 2).is_err());
    }
}
