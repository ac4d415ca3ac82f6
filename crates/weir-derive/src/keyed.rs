//! A keyed source's rows for the keys a change touched, read by key from the stored table
//! behind it (see [`weir_lake::keyed`]) instead of a semi join over the whole table.
//!
//! Two kinds of source qualify: a stored table, and a view that is row-wise over one stored
//! table and passes the key through (projections, filters and aliases only, no subquery): a
//! view row of key `k` comes from the table's row of key `k`, so the view over the keys'
//! rows is the view's rows of those keys. Anything else is read as before.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::{MemTable, provider_as_source, source_as_provider};
use datafusion::logical_expr::{Expr, LogicalPlan, TableScan};
use datafusion::prelude::DataFrame;
use weir_lake::{KeyScope, Lake};

use crate::session::LakeSession;
use crate::{DeriveError, df_err};

/// The rows of `src` whose integer column `key` holds one of `keys`, in `schema` (the
/// source's as registered); None when `src` is neither a stored table nor a row-wise view
/// over one (see the module documentation).
pub(crate) async fn rows_by_key(
    lake: &Lake,
    session: &LakeSession,
    src: &str,
    key: &str,
    keys: &KeyScope,
    schema: &SchemaRef,
) -> Result<Option<Vec<RecordBatch>>, DeriveError> {
    if !schema.field_with_name(key).is_ok_and(|f| f.data_type().is_integer()) {
        return Ok(None);
    }
    let what = format!("reading {src} by key");
    let provider = session.ctx.table_provider(src).await.map_err(df_err(&what))?;
    if let Some(table) = session.stored_as(src, &provider) {
        return Ok(Some(read_stored(lake, src, table, key, keys, schema).await?));
    }
    let Some(plan) = provider.get_logical_plan() else { return Ok(None) };
    let Some(scan) = row_wise_scan(&plan, key) else { return Ok(None) };
    let base = source_as_provider(&scan.source).map_err(df_err(&what))?;
    let Some(name) = scan.table_name.schema().map(|s| format!("{s}.{}", scan.table_name.table())) else {
        return Ok(None);
    };
    let Some(table) = session.stored_as(&name, &base) else { return Ok(None) };
    let base_schema = base.schema();
    let rows = read_stored(lake, &name, table, key, keys, &base_schema).await?;
    let restricted: Arc<dyn TableProvider> =
        Arc::new(MemTable::try_new(base_schema, vec![rows]).map_err(df_err(&what))?);
    // The view's plan over the keys' rows of its table.
    let plan = plan
        .into_owned()
        .transform_up(|p| match p {
            LogicalPlan::TableScan(s) => Ok(Transformed::yes(LogicalPlan::TableScan(TableScan {
                source: provider_as_source(restricted.clone()),
                ..s
            }))),
            other => Ok(Transformed::no(other)),
        })
        .map_err(df_err(&what))?
        .data;
    let batches = DataFrame::new(session.ctx.state(), plan).collect().await.map_err(df_err(&what))?;
    Ok(Some(conformed(schema, batches, src)?))
}

/// `table`'s rows of `keys`, in `schema`.
async fn read_stored(
    lake: &Lake,
    name: &str,
    table: &deltalake::DeltaTable,
    key: &str,
    keys: &KeyScope,
    schema: &SchemaRef,
) -> Result<Vec<RecordBatch>, DeriveError> {
    let rel = name.replace('.', "/");
    let read = weir_lake::rows_with_keys(lake, table, &rel, key, keys).await?;
    conformed(schema, read, &rel)
}

/// `batches` in `schema`'s columns and types, by name.
fn conformed(schema: &SchemaRef, batches: Vec<RecordBatch>, rel: &str) -> Result<Vec<RecordBatch>, DeriveError> {
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        out.push(weir_lake::conform(schema, b, rel)?);
    }
    Ok(out)
}

/// The one table scan under `plan` when `plan` is row-wise over it and passes `key` through
/// as it is: projections whose `key` is the input's `key`, filters, aliases; no subquery, no
/// limit.
fn row_wise_scan<'a>(plan: &'a LogicalPlan, key: &str) -> Option<&'a TableScan> {
    match plan {
        LogicalPlan::Projection(p) => {
            let (e, _) = p.expr.iter().zip(p.schema.fields()).find(|(_, f)| f.name() == key)?;
            let passes = matches!(e.clone().unalias(), Expr::Column(c) if c.name == key);
            (passes && p.expr.iter().all(|e| !has_subquery(e))).then(|| row_wise_scan(&p.input, key)).flatten()
        }
        LogicalPlan::Filter(f) => (!has_subquery(&f.predicate)).then(|| row_wise_scan(&f.input, key)).flatten(),
        LogicalPlan::SubqueryAlias(a) => row_wise_scan(&a.input, key),
        LogicalPlan::TableScan(s) => {
            (s.fetch.is_none() && s.projected_schema.field_with_unqualified_name(key).is_ok()).then_some(s)
        }
        _ => None,
    }
}

/// Whether `e` reads a subquery (which may read other rows, or other tables).
fn has_subquery(e: &Expr) -> bool {
    let mut found = false;
    let _ = e.apply(|e| {
        found = matches!(
            e,
            Expr::ScalarSubquery(_) | Expr::InSubquery(_) | Expr::Exists(_) | Expr::OuterReferenceColumn(..)
        );
        Ok(if found { TreeNodeRecursion::Stop } else { TreeNodeRecursion::Continue })
    });
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::prelude::SessionContext;

    async fn scan_of(sql: &str) -> Option<String> {
        let ctx = SessionContext::new();
        let schema = Arc::new(Schema::new(vec![
            Field::new("listing_id", DataType::Int64, false),
            Field::new("x", DataType::Int64, true),
        ]));
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(vec![1, 2])), Arc::new(Int64Array::from(vec![Some(3), None]))],
        )
        .unwrap();
        ctx.register_table("t", Arc::new(MemTable::try_new(schema, vec![vec![b]]).unwrap())).unwrap();
        let plan = ctx.sql(sql).await.unwrap().logical_plan().clone();
        row_wise_scan(&plan, "listing_id").map(|s| s.table_name.to_string())
    }

    #[tokio::test]
    async fn only_views_row_wise_over_one_table_that_keep_the_key_are_read_by_key() {
        let by_key = [
            "SELECT listing_id, x + 1 AS y, x IS NULL AS gone FROM t WHERE x > 0",
            "SELECT a.listing_id AS listing_id, a.x FROM t a",
            "SELECT listing_id FROM (SELECT listing_id, x FROM t WHERE x IS NOT NULL) s",
        ];
        for sql in by_key {
            assert_eq!(scan_of(sql).await.as_deref(), Some("t"), "{sql}");
        }
        let whole = [
            // the key is computed, or another column is named as it
            "SELECT listing_id + 1 AS listing_id FROM t",
            "SELECT x AS listing_id FROM t",
            // other rows of the key's table, or other tables, reach a row
            "SELECT listing_id, count(*) AS n FROM t GROUP BY listing_id",
            "SELECT listing_id FROM t WHERE x > (SELECT avg(x) FROM t)",
            "SELECT a.listing_id FROM t a JOIN t b ON a.x = b.x",
            "SELECT listing_id, sum(x) OVER () AS s FROM t",
            "SELECT listing_id FROM t LIMIT 1",
            "SELECT DISTINCT listing_id FROM t",
        ];
        for sql in whole {
            assert_eq!(scan_of(sql).await, None, "{sql}");
        }
    }
}
