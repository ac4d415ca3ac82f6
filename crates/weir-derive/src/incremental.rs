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

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, new_null_array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::MemTable;
use datafusion::common::ScalarValue;
use datafusion::prelude::{col, in_list, lit};
use deltalake::DeltaTable;
use deltalake::delta_datafusion::DeltaCdfTableProvider;
use deltalake::kernel::transaction::CommitProperties;
use serde_json::{Value, json};
use weir_lake::Lake;

use crate::jobs::{Incremental, Job};
use crate::session::LakeSession;
use crate::{DeriveError, df_err};

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

fn version_of(token: Option<&Value>) -> Option<i64> {
    token?.as_str()?.strip_prefix('v')?.parse().ok()
}

#[allow(clippy::too_many_arguments)]
pub async fn attempt(
    lake: &Lake,
    session: &LakeSession,
    job: &Job,
    inc: &Incremental,
    out: &str,
    table: DeltaTable,
    previous: &Value,
    state: &Value,
    recorded: &Value,
    as_of_micros: i64,
) -> Result<Attempt, DeriveError> {
    use Attempt::NotApplicable as Na;
    if previous.get("definition") != state.get("definition") {
        return Ok(Na("its definition changed".into()));
    }
    if previous.get("as_of_micros") != state.get("as_of_micros") {
        return Ok(Na("the as-of changed".into()));
    }
    let (Some(before), Some(now)) =
        (previous.get("inputs").and_then(Value::as_object), state.get("inputs").and_then(Value::as_object))
    else {
        return Ok(Na("no recorded inputs".into()));
    };
    let mut changed = Vec::new();
    for (name, token) in now {
        if before.get(name) == Some(token) {
            continue;
        }
        let (Some(from), Some(to)) = (version_of(before.get(name)), version_of(Some(token))) else {
            return Ok(Na(format!("{name} changed and is not a stored table")));
        };
        if !name.starts_with("bronze.") || to < from {
            return Ok(Na(format!("{name} v{from} → v{to} is not a change feed Weir reads")));
        }
        if *name != inc.fold && !inc.affects.contains_key(name) && !inc.removes.contains_key(name) {
            return Ok(Na(format!("{name} changed and the job has no incremental rule for it")));
        }
        changed.push(Changed { name: name.clone(), from, to });
    }
    if changed.is_empty() {
        return Ok(Na("no input changed".into()));
    }

    // Every changed input: a change feed, and only CDC commits in the range.
    let mut feeds = Vec::new();
    for c in &changed {
        let rel = c.name.replace('.', "/");
        let t = weir_lake::open_table(lake, &rel).await?;
        let enabled = t
            .snapshot()
            .map(|s| s.table_config().enable_change_data_feed.unwrap_or(false))
            .map_err(|e| DeriveError::Write { table: c.name.clone(), message: e.to_string() })?;
        if !enabled {
            return Ok(Na(format!("{} has no change data feed (a new `weir backfill --force` enables it)", c.name)));
        }
        let latest = t.version().map_or(0, |v| v as i64);
        let history = t
            .history(Some((latest - c.from).max(0) as usize))
            .await
            .map_err(|e| DeriveError::Write { table: c.name.clone(), message: e.to_string() })?;
        for (i, ci) in history.enumerate() {
            let v = latest - i as i64;
            if v > c.from && v <= c.to && !ci.info.contains_key("weir.cdc.lsn") {
                return Ok(Na(format!("{} v{v} is not a CDC commit (a backfill?)", c.name)));
            }
        }
        let cdf = DeltaCdfTableProvider::try_new(
            t.scan_cdf().with_starting_version(c.from as u64 + 1).with_ending_version(c.to as u64),
        )
        .map_err(|e| DeriveError::Write { table: c.name.clone(), message: e.to_string() })?;
        feeds.push((c, Arc::new(cdf)));
    }

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
    let fold_provider = ctx.table_provider(inc.fold.as_str()).await.map_err(df_err(format!("reading {}", inc.fold)))?;
    let fold_schema = fold_provider.schema();
    let quoted: Vec<String> = fold_schema.fields().iter().map(|f| format!("\"{}\"", f.name())).collect();
    let mut recompute: HashSet<ScalarValue> = HashSet::new();
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
    let new_table = match feeds.iter().find(|(c, _)| c.name == inc.fold) {
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
    ctx.register_table("current", current).map_err(df_err("registering current"))?;
    let mut removed: HashSet<ScalarValue> = HashSet::new();
    for (c, cdf) in feeds.iter().filter(|(c, _)| c.name != inc.fold) {
        ctx.register_table("changes", cdf.clone()).map_err(df_err("registering the change feed"))?;
        let mut result = Ok(());
        for (rules, into) in [(&inc.affects, &mut recompute), (&inc.removes, &mut removed)] {
            let Some(rule) = rules.get(&c.name) else { continue };
            match collect(rule.clone()).await {
                Ok(batches) => {
                    for b in batches {
                        add_keys(into, b.column(0))?;
                    }
                }
                Err(e) => result = Err(e),
            }
        }
        ctx.deregister_table("changes").map_err(df_err("deregistering"))?;
        result?;
    }
    let keys: Vec<ScalarValue> = recompute.into_iter().filter(|k| !k.is_null() && !removed.contains(k)).collect();
    let removed: Vec<ScalarValue> = removed.into_iter().filter(|k| !k.is_null()).collect();
    lap!("rules");

    // delta: the job over the new rows whose keys are not recomputed.
    let restore = |p| session.replace(&inc.fold, p);
    let mut new_view = ctx.table("new_rows").await.map_err(df_err("new_rows"))?;
    if !keys.is_empty() || !removed.is_empty() {
        let ks: Vec<_> = keys.iter().chain(&removed).map(|k| lit(k.clone())).collect();
        new_view = new_view.filter(in_list(col(key.as_str()), ks, true)).map_err(df_err("filtering new rows"))?;
    }
    session.replace(&inc.fold, new_view.into_view())?;
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
    let merged = collect(inc.merge.clone()).await;
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
        session.replace(&inc.fold, filtered.into_view())?;
        let r = collect(sql.clone()).await;
        restore(fold_provider.clone())?;
        recomputed = r?;
    }
    lap!("recompute");

    // One MERGE by key: upserts from both, deletes for recomputed keys without a row.
    let target: SchemaRef = table
        .snapshot()
        .map_err(|e| DeriveError::Write { table: out.to_string(), message: e.to_string() })?
        .snapshot()
        .arrow_schema();
    let mut found: HashSet<ScalarValue> = HashSet::new();
    let mut parts = Vec::new();
    let mut merged_keys = 0u64;
    for (i, b) in merged.iter().chain(recomputed.iter()).enumerate() {
        if i >= merged.len() {
            add_keys(&mut found, b.column_by_name(key).ok_or_else(|| missing(out, key))?)?;
        } else {
            merged_keys += b.num_rows() as u64;
        }
        parts.push(with_op(&target, b, "U", out)?);
    }
    let gone: Vec<ScalarValue> = keys.iter().filter(|k| !found.contains(*k)).chain(&removed).cloned().collect();
    if !gone.is_empty() {
        parts.push(deletes(&target, key, &gone, out)?);
    }
    let schema = match parts.first() {
        Some(p) => p.schema(),
        None => with_op(&target, &RecordBatch::new_empty(target.clone()), "U", out)?.schema(),
    };
    let source = arrow::compute::concat_batches(&schema, &parts)
        .map_err(|e| DeriveError::Write { table: out.to_string(), message: e.to_string() })?;
    let inputs: Vec<String> = changed.iter().map(|c| format!("{} v{} → v{}", c.name, c.from, c.to)).collect();
    let summary = json!({
        "new_rows": new_rows, "merged": merged_keys, "recomputed": keys.len(), "deleted": gone.len(), "inputs": inputs,
        "phases_ms": phases.iter().map(|(n, d)| (n.to_string(), json!(d.as_millis() as u64))).collect::<serde_json::Map<_, _>>(),
    });
    let props = CommitProperties::default().with_metadata([
        (crate::run::STATE_KEY.to_string(), Value::String(recorded.to_string())),
        ("weir.derive.key".to_string(), json!(job.key)),
        ("weir.derive.incremental".to_string(), summary),
    ]);
    let rel = out.replace('.', "/");
    let (table, _) =
        weir_lake::merge_by_key(table, &rel, source, std::slice::from_ref(key), crate::run::writer_properties(), props)
            .await?;
    phases.push(("Delta merge", clock.elapsed()));
    Ok(Attempt::Done(IncrementalReport {
        version: table.version().map_or(0, |v| v as i64),
        new_rows,
        merged: merged_keys,
        recomputed: keys.len() as u64,
        deleted: gone.len() as u64,
        inputs,
        phases,
    }))
}

fn missing(out: &str, key: &str) -> DeriveError {
    DeriveError::Write { table: out.to_string(), message: format!("the job's result has no key column {key}") }
}

fn add_keys(set: &mut HashSet<ScalarValue>, a: &ArrayRef) -> Result<(), DeriveError> {
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
fn deletes(target: &SchemaRef, key: &str, keys: &[ScalarValue], out: &str) -> Result<RecordBatch, DeriveError> {
    let err = |m: String| DeriveError::Write { table: out.to_string(), message: m };
    let mut cols: Vec<ArrayRef> = Vec::new();
    for f in target.fields() {
        cols.push(if f.name() == key {
            let a = ScalarValue::iter_to_array(keys.iter().cloned()).map_err(df_err("building delete keys"))?;
            if a.data_type() == f.data_type() {
                a
            } else {
                arrow::compute::cast(&a, f.data_type()).map_err(|e| err(e.to_string()))?
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
