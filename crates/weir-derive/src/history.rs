//! `materialize = "history"`: a job whose table keeps every version of each key, valid from
//! one run's as-of to the next change, so any past state can be read back (point-in-time
//! correct: a version is only ever visible from the instant the lake knew it).
//!
//! Each run compares the job's result with the open versions (`valid_to IS NULL`):
//! - a key whose values differ, or that is new, gets a version `valid_from` = the as-of;
//! - its previous open version is closed (`valid_to` = the as-of);
//! - a key the result no longer has is closed;
//! - a version opened at this very as-of (a rerun after a definition change) is replaced.
//!
//! All of it is one Delta MERGE on (key…, valid_from): a crash leaves the previous state.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::dataframe::DataFrame;
use deltalake::kernel::transaction::CommitProperties;
use serde_json::{Value, json};

use crate::jobs::Job;
use crate::session::LakeSession;
use crate::{DeriveError, df_err};

pub const VALID_FROM: &str = "valid_from";
pub const VALID_TO: &str = "valid_to";

const CURRENT: &str = "__weir_current";
const HISTORY: &str = "__weir_history";
const DIFF: &str = "__weir_history_diff";

#[derive(Debug, Clone)]
pub struct HistoryReport {
    pub version: i64,
    /// New versions (changed or new keys).
    pub opened: u64,
    /// Versions closed because their key changed or went.
    pub closed: u64,
}

/// The SQL literal of an as-of instant, typed like the job's `${as_of}`.
fn as_of_literal(as_of_micros: i64) -> String {
    format!("(to_timestamp_micros({as_of_micros}) AT TIME ZONE 'UTC')")
}

fn quoted(c: &str) -> String {
    format!("\"{}\"", c.replace('"', "\"\""))
}

/// The first build: every row of the result opens a version at the as-of.
pub(crate) fn opened(df: DataFrame, as_of_micros: i64) -> Result<DataFrame, DeriveError> {
    use datafusion::prelude::{Expr, col, lit, when};
    let at = Expr::Literal(
        datafusion::scalar::ScalarValue::TimestampMicrosecond(Some(as_of_micros), Some("UTC".into())),
        None,
    );
    let never = when(lit(false), at.clone()).end().map_err(df_err("a history table"))?;
    let mut exprs: Vec<Expr> =
        df.schema().fields().iter().map(|f| col(datafusion::common::Column::from_name(f.name()))).collect();
    exprs.push(at.alias(VALID_FROM));
    exprs.push(never.alias(VALID_TO));
    df.select(exprs).map_err(df_err("a history table"))
}

/// Applies one run's result to an existing history table (see the module docs).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn apply(
    lake: &weir_lake::Lake,
    session: &LakeSession,
    job: &Job,
    out: &str,
    table: deltalake::DeltaTable,
    current: DataFrame,
    recorded: &Value,
    as_of_micros: i64,
) -> Result<HistoryReport, DeriveError> {
    let werr = |m: String| DeriveError::Write { table: out.to_string(), message: m };
    let cols: Vec<String> = current.schema().fields().iter().map(|f| f.name().clone()).collect();
    for k in &job.key {
        if !cols.contains(k) {
            return Err(werr(format!("the job's result has no key column {k}")));
        }
    }
    let target: SchemaRef = table.snapshot().map_err(|e| werr(e.to_string()))?.snapshot().arrow_schema();
    for c in &cols {
        if target.field_with_name(c).is_err() {
            return Err(werr(format!(
                "the job now returns column {c}, which the history table does not have: a history keeps its columns (drop the table to start a new history)"
            )));
        }
    }
    let ctx = &session.ctx;
    let _ = ctx.deregister_table(CURRENT);
    let _ = ctx.deregister_table(HISTORY);
    ctx.register_table(CURRENT, current.into_view()).map_err(df_err("a history table"))?;
    ctx.register_table(HISTORY, crate::session::provider(ctx, &table, out).await?)
        .map_err(df_err("a history table"))?;
    let result = run(ctx, job, out, &cols, &target, as_of_micros).await;
    let _ = ctx.deregister_table(CURRENT);
    let _ = ctx.deregister_table(HISTORY);
    let (source, opened, closed) = result?;
    let summary = json!({ "opened": opened, "closed": closed, "as_of_micros": as_of_micros });
    let metadata = [
        (crate::run::STATE_KEY.to_string(), Value::String(recorded.to_string())),
        ("weir.derive.key".to_string(), json!(job.key)),
        ("weir.derive.history".to_string(), summary),
    ];
    let rel = out.replace('.', "/");
    if source.num_rows() == 0 {
        // Nothing changed: record that the table is built from these inputs.
        let version = weir_lake::commit_metadata(&table, &rel, metadata.into_iter().collect()).await?;
        return Ok(HistoryReport { version, opened, closed });
    }
    let props = CommitProperties::default().with_metadata(metadata);
    let mut on = job.key.clone();
    on.push(VALID_FROM.to_string());
    let (table, _) = weir_lake::merge_by_key(
        lake,
        table,
        &rel,
        source,
        &on,
        crate::run::writer_properties(),
        props,
        Default::default(),
        None,
    )
    .await?;
    Ok(HistoryReport { version: table.version().map_or(0, |v| v as i64), opened, closed })
}

async fn run(
    ctx: &datafusion::prelude::SessionContext,
    job: &Job,
    out: &str,
    cols: &[String],
    target: &SchemaRef,
    as_of_micros: i64,
) -> Result<(RecordBatch, u64, u64), DeriveError> {
    let werr = |m: String| DeriveError::Write { table: out.to_string(), message: m };
    let at = as_of_literal(as_of_micros);
    check_forward(ctx, HISTORY, out, as_of_micros).await?;
    // One pass: the job's result against the open versions, by key; only keys whose
    // values differ (or that exist on one side only) come back, and are few.
    let on = job.key.iter().map(|k| format!("c.{q} = o.{q}", q = quoted(k))).collect::<Vec<_>>().join(" AND ");
    let differs = cols.iter().map(|c| format!("(c.{q} IS DISTINCT FROM o.{q})", q = quoted(c))).collect::<Vec<_>>();
    let side =
        |p: &'static str| cols.iter().map(move |c| format!("{p}.{} AS {}", quoted(c), quoted(&format!("{p}__{c}"))));
    let diff_cols: Vec<String> = side("c")
        .chain(side("o"))
        .chain([
            format!("o.{VALID_FROM} AS o__{VALID_FROM}"),
            format!("o.{VALID_TO} AS o__{VALID_TO}"),
            "c.__weir_c AS c__present".to_string(),
            "o.__weir_o AS o__present".to_string(),
        ])
        .collect();
    let diff_sql = format!(
        "SELECT {diff_cols}
         FROM (SELECT *, true AS __weir_c FROM {CURRENT}) c
         FULL OUTER JOIN (SELECT *, true AS __weir_o FROM {HISTORY} WHERE {VALID_TO} IS NULL) o ON {on}
         WHERE (c.__weir_c IS NULL) OR (o.__weir_o IS NULL) OR {differs}",
        diff_cols = diff_cols.join(", "),
        differs = differs.join(" OR "),
    );
    let context = format!("comparing {} with its open versions", job.file.display());
    let diff = ctx.sql(&diff_sql).await.map_err(df_err(&context))?.collect().await.map_err(df_err(&context))?;
    let Some(diff_schema) = diff.first().map(|b| b.schema()) else {
        return Err(werr("the comparison returned no batch".into()));
    };
    let _ = ctx.deregister_table(DIFF);
    let mem = datafusion::catalog::MemTable::try_new(diff_schema, vec![diff]).map_err(df_err(&context))?;
    ctx.register_table(DIFF, Arc::new(mem)).map_err(df_err(&context))?;
    let result = versions(ctx, job, cols, &at, &context).await;
    let _ = ctx.deregister_table(DIFF);
    let batches = result.map_err(|e| match e {
        Versions::NullKeys(n) => werr(format!(
            "{n} rows of the job's result have a NULL key ({}): a history needs a key on every row",
            job.key.join(", ")
        )),
        Versions::Failed(e) => e,
    })?;
    // The merge source: the table's columns, in its order and types, plus the operation.
    let mut fields: Vec<Field> =
        target.fields().iter().map(|f| Field::new(f.name(), f.data_type().clone(), true)).collect();
    fields.push(Field::new(weir_lake::OP_COLUMN, DataType::Utf8, false));
    let schema = Arc::new(Schema::new(fields));
    let mut parts = Vec::new();
    let (mut opened, mut closed) = (0u64, 0u64);
    for b in &batches {
        let mut columns: Vec<ArrayRef> = Vec::new();
        for f in schema.fields() {
            let c = b.column_by_name(f.name()).ok_or_else(|| werr(format!("no column {} in the result", f.name())))?;
            columns.push(if c.data_type() == f.data_type() {
                c.clone()
            } else {
                arrow::compute::cast(c, f.data_type()).map_err(|e| werr(e.to_string()))?
            });
        }
        let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| werr(e.to_string()))?;
        let ops = batch.column(schema.fields().len() - 1).as_any().downcast_ref::<arrow::array::StringArray>();
        if let (Some(ops), Some(to)) = (ops, batch.column_by_name(VALID_TO)) {
            for (i, op) in ops.iter().enumerate() {
                match (op, to.is_null(i)) {
                    (Some("U"), true) => opened += 1,
                    (Some("U"), false) => closed += 1,
                    _ => {}
                }
            }
        }
        parts.push(batch);
    }
    let source = arrow::compute::concat_batches(&schema, &parts).map_err(|e| werr(e.to_string()))?;
    Ok((source, opened, closed))
}

/// Refuses an as-of before the newest version of the history registered as `table` in
/// `ctx` (`out` names it in the error): a history only moves forward.
pub async fn check_forward(
    ctx: &datafusion::prelude::SessionContext,
    table: &str,
    out: &str,
    as_of_micros: i64,
) -> Result<(), DeriveError> {
    let newest = ctx
        .sql(&format!("SELECT CAST(max({VALID_FROM}) AS BIGINT) AS m FROM {table}"))
        .await
        .map_err(df_err(format!("reading {out}")))?
        .collect()
        .await
        .map_err(df_err(format!("reading {out}")))?;
    let newest = newest
        .first()
        .and_then(|b| b.column(0).as_any().downcast_ref::<arrow::array::Int64Array>().and_then(|a| a.iter().next()))
        .flatten();
    match newest.filter(|n| *n > as_of_micros) {
        Some(n) => Err(DeriveError::Write {
            table: out.to_string(),
            message: format!(
                "the as-of {} is before the history's newest version ({}): a history only moves forward",
                micros_text(as_of_micros),
                micros_text(n)
            ),
        }),
        None => Ok(()),
    }
}

enum Versions {
    NullKeys(i64),
    Failed(DeriveError),
}

/// From the registered difference: the new versions, the closed ones and the deleted ones
/// (opened at this very as-of and gone again), each with its merge operation.
async fn versions(
    ctx: &datafusion::prelude::SessionContext,
    job: &Job,
    cols: &[String],
    at: &str,
    context: &str,
) -> Result<Vec<RecordBatch>, Versions> {
    let run = |sql: String| async move {
        ctx.sql(&sql).await.map_err(df_err(context))?.collect().await.map_err(df_err(context))
    };
    let null_key = job.key.iter().map(|k| format!("{} IS NULL", quoted(&format!("c__{k}")))).collect::<Vec<_>>();
    let nulls = run(format!("SELECT count(*) FROM {DIFF} WHERE c__present AND ({})", null_key.join(" OR ")))
        .await
        .map_err(Versions::Failed)?;
    let null_count = nulls
        .first()
        .and_then(|b| b.column(0).as_any().downcast_ref::<arrow::array::Int64Array>().map(|a| a.value(0)))
        .unwrap_or(0);
    if null_count > 0 {
        return Err(Versions::NullKeys(null_count));
    }
    let pick = |p: &str| {
        cols.iter().map(|c| format!("{} AS {}", quoted(&format!("{p}__{c}")), quoted(c))).collect::<Vec<_>>().join(", ")
    };
    run(format!(
        "SELECT {c}, {at} AS {VALID_FROM}, CASE WHEN false THEN {at} END AS {VALID_TO}, 'U' AS {op}
         FROM {DIFF} WHERE c__present
         UNION ALL
         SELECT {o}, o__{VALID_FROM} AS {VALID_FROM}, {at} AS {VALID_TO}, 'U' AS {op}
         FROM {DIFF} WHERE o__present AND o__{VALID_FROM} < {at}
         UNION ALL
         SELECT {o}, o__{VALID_FROM} AS {VALID_FROM}, o__{VALID_TO} AS {VALID_TO}, 'D' AS {op}
         FROM {DIFF} WHERE o__present AND c__present IS NULL AND o__{VALID_FROM} = {at}",
        c = pick("c"),
        o = pick("o"),
        op = weir_lake::OP_COLUMN,
    ))
    .await
    .map_err(Versions::Failed)
}

fn micros_text(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us).map_or_else(|| us.to_string(), |t| t.to_rfc3339())
}
