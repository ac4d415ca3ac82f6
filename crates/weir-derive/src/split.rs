//! Rows in memory split by the value of one integer column (a per-make job's `make_id`): a
//! scan whose filters fix that column (`make_id = 7`) reads that value's rows alone.
//!
//! The incremental marts share one fork whose keyed sources hold every make's affected rows;
//! each make's SQL filters them by its make_id. Split, each of the 40 reads its own rows
//! instead of scanning and filtering all of them.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{RecordBatch, UInt32Array};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::{MemTable, Session, TableProvider};
use datafusion::common::{Result, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;

/// See the module documentation. Filters are applied again above the scan (inexact).
#[derive(Debug)]
pub struct SplitTable {
    column: String,
    all: MemTable,
    parts: HashMap<i64, MemTable>,
}

impl SplitTable {
    /// Whether `column` can split rows of `schema`: one of its integer columns.
    pub fn splits(schema: &SchemaRef, column: &str) -> bool {
        schema.field_with_name(column).is_ok_and(|f| f.data_type().is_integer())
    }

    /// `batches` split by `column` (see [`SplitTable::splits`]). Each value's rows are held
    /// once: a scan of everything reads every value's rows as a partition of its own.
    pub fn try_new(schema: SchemaRef, batches: Vec<RecordBatch>, column: &str) -> Result<Self> {
        let index = schema.index_of(column)?;
        // NULL's rows (None) match no `column = value` filter: only a scan of everything reads them.
        let mut groups: HashMap<Option<i64>, Vec<RecordBatch>> = HashMap::new();
        for b in &batches {
            let values = arrow::compute::cast(b.column(index), &DataType::Int64)?;
            let values = arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(&values);
            let mut rows: HashMap<Option<i64>, Vec<u32>> = HashMap::new();
            for (i, v) in values.iter().enumerate() {
                rows.entry(v).or_default().push(i as u32);
            }
            for (v, idx) in rows {
                groups.entry(v).or_default().push(arrow::compute::take_record_batch(b, &UInt32Array::from(idx))?);
            }
        }
        drop(batches);
        let mut every: Vec<Vec<RecordBatch>> = groups.values().cloned().collect();
        if every.is_empty() {
            every.push(Vec::new());
        }
        let parts = groups
            .into_iter()
            .filter_map(|(v, g)| v.map(|v| (v, g)))
            .map(|(v, g)| Ok((v, MemTable::try_new(schema.clone(), vec![g])?)))
            .collect::<Result<_>>()?;
        Ok(SplitTable { column: column.to_string(), all: MemTable::try_new(schema, every)?, parts })
    }

    /// The value a filter fixes the column to (`column = literal`, either way round).
    fn fixed(&self, filter: &Expr) -> Option<i64> {
        let Expr::BinaryExpr(BinaryExpr { left, op: Operator::Eq, right }) = filter else { return None };
        let value = match (left.as_ref(), right.as_ref()) {
            (Expr::Column(c), Expr::Literal(v, _)) | (Expr::Literal(v, _), Expr::Column(c))
                if c.name == self.column =>
            {
                v
            }
            _ => return None,
        };
        match value.cast_to(&DataType::Int64).ok()? {
            ScalarValue::Int64(v) => v,
            _ => None,
        }
    }
}

#[async_trait::async_trait]
impl TableProvider for SplitTable {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn schema(&self) -> SchemaRef {
        self.all.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| match self.fixed(f) {
                Some(_) => TableProviderFilterPushDown::Inexact,
                None => TableProviderFilterPushDown::Unsupported,
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let empty;
        let table = match filters.iter().find_map(|f| self.fixed(f)) {
            Some(v) => match self.parts.get(&v) {
                Some(t) => t,
                None => {
                    empty = MemTable::try_new(self.all.schema(), vec![vec![]])?;
                    &empty
                }
            },
            None => &self.all,
        };
        table.scan(state, projection, &[], limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, Int64Array};
    use arrow::datatypes::{Field, Schema};
    use datafusion::prelude::SessionContext;

    #[tokio::test]
    async fn a_fixed_value_reads_its_rows_and_anything_else_reads_all() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("make_id", DataType::Int32, true),
        ]));
        let batch = |ids: Vec<i64>, makes: Vec<Option<i32>>| {
            RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(Int64Array::from(ids)), Arc::new(Int32Array::from(makes))],
            )
            .unwrap()
        };
        let batches =
            vec![batch(vec![1, 2, 3], vec![Some(7), Some(8), None]), batch(vec![4, 5], vec![Some(7), Some(9)])];
        assert!(SplitTable::splits(&schema, "make_id") && !SplitTable::splits(&schema, "nope"));
        let t = SplitTable::try_new(schema.clone(), batches, "make_id").unwrap();
        let ctx = SessionContext::new();
        ctx.register_table("t", Arc::new(t)).unwrap();
        let ids = |sql: &'static str| {
            let ctx = ctx.clone();
            async move {
                let mut out: Vec<i64> = Vec::new();
                for b in ctx.sql(sql).await.unwrap().collect().await.unwrap() {
                    let c = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                    out.extend(c.values().iter().copied());
                }
                out.sort();
                out
            }
        };
        assert_eq!(ids("SELECT id FROM t WHERE make_id = 7").await, vec![1, 4]);
        assert_eq!(ids("SELECT id FROM t WHERE 9 = make_id").await, vec![5]);
        assert_eq!(ids("SELECT id FROM t WHERE make_id = 6").await, Vec::<i64>::new());
        // Other filters than `make_id = v` still apply, above the scan.
        assert_eq!(ids("SELECT id FROM t WHERE make_id = 7 AND id > 1").await, vec![4]);
        assert_eq!(ids("SELECT id FROM t WHERE make_id > 7").await, vec![2, 5]);
        assert_eq!(ids("SELECT id FROM t").await, vec![1, 2, 3, 4, 5]);
        assert_eq!(ids("SELECT id FROM t WHERE make_id IS NULL").await, vec![3]);
    }
}
