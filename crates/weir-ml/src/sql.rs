//! The ML reads as SQL table functions, for any Flight SQL client:
//! `SELECT * FROM similar_listings(123, 10)` (optionally a filter: `similar_listings(123, 10,
//! 'country = ''DE'' AND is_active')`) and `SELECT * FROM features_at(123, TIMESTAMP
//! '2026-07-01 00:00:00')`.

use std::sync::Arc;

use datafusion::catalog::{MemTable, TableFunctionImpl, TableProvider};
use datafusion::common::{DataFusionError, ScalarValue, plan_err};
use datafusion::logical_expr::Expr;
use datafusion::prelude::SessionContext;
use weir_lake::Lake;

use crate::search::{Query, SimilarRequest};

#[derive(Debug)]
struct SimilarListings {
    lake: Lake,
}

#[derive(Debug)]
struct FeaturesAt {
    lake: Lake,
}

fn literal(args: &[Expr], i: usize, what: &str) -> Result<Option<ScalarValue>, DataFusionError> {
    match args.get(i) {
        None => Ok(None),
        Some(Expr::Literal(v, _)) => Ok(Some(v.clone())),
        Some(e) => plan_err!("{what} must be a literal, not {e}"),
    }
}

fn int(v: Option<ScalarValue>, what: &str) -> Result<Option<i64>, DataFusionError> {
    match v {
        None => Ok(None),
        Some(v) => match v.cast_to(&arrow::datatypes::DataType::Int64)? {
            ScalarValue::Int64(Some(n)) => Ok(Some(n)),
            _ => plan_err!("{what} must be an integer"),
        },
    }
}

/// Runs an async ML read from inside DataFusion's synchronous table-function call.
fn block_on<T>(f: impl Future<Output = Result<T, crate::MlError>>) -> Result<T, DataFusionError> {
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|_| DataFusionError::Execution("the ML table functions need a tokio runtime".into()))?;
    if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        return Err(DataFusionError::Execution("the ML table functions need a multi-threaded tokio runtime".into()));
    }
    tokio::task::block_in_place(|| handle.block_on(f)).map_err(|e| DataFusionError::Execution(e.to_string()))
}

fn table(batch: arrow::array::RecordBatch) -> Result<Arc<dyn TableProvider>, DataFusionError> {
    Ok(Arc::new(MemTable::try_new(batch.schema(), vec![vec![batch]])?))
}

impl TableFunctionImpl for SimilarListings {
    fn call(&self, args: &[Expr]) -> Result<Arc<dyn TableProvider>, DataFusionError> {
        let usage = "similar_listings(listing_id, k [, filter])";
        let Some(id) = int(literal(args, 0, "listing_id")?, "listing_id")? else {
            return plan_err!("usage: {usage}");
        };
        let k = int(literal(args, 1, "k")?, "k")?.unwrap_or(10);
        let filter = match literal(args, 2, "filter")? {
            None => None,
            Some(ScalarValue::Utf8(s) | ScalarValue::Utf8View(s) | ScalarValue::LargeUtf8(s)) => s,
            Some(_) => return plan_err!("the filter of {usage} must be text"),
        };
        if args.len() > 3 {
            return plan_err!("usage: {usage}");
        }
        let req = SimilarRequest {
            query: Query::Listing(id),
            k: usize::try_from(k).unwrap_or(0),
            filter,
            columns: vec![],
            exact: false,
        };
        let lake = self.lake.clone();
        let batch = block_on(async move {
            let ds = crate::vectors::open(&lake).await?.ok_or_else(|| {
                crate::MlError::Missing(format!("{} is not built yet: run `weir features`", crate::vectors::DATASET))
            })?;
            crate::search::similar(&ds, &req).await
        })?;
        table(batch)
    }
}

impl TableFunctionImpl for FeaturesAt {
    fn call(&self, args: &[Expr]) -> Result<Arc<dyn TableProvider>, DataFusionError> {
        let usage = "features_at(listing_id, timestamp)";
        if args.len() != 2 {
            return plan_err!("usage: {usage}");
        }
        let Some(id) = int(literal(args, 0, "listing_id")?, "listing_id")? else {
            return plan_err!("usage: {usage}");
        };
        let utc = arrow::datatypes::DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into()));
        let ts = match literal(args, 1, "timestamp")? {
            Some(v) => match v.cast_to(&utc)? {
                ScalarValue::TimestampMicrosecond(Some(t), _) => t,
                _ => return plan_err!("the timestamp of {usage} is NULL"),
            },
            None => return plan_err!("usage: {usage}"),
        };
        let request = arrow::array::RecordBatch::try_from_iter(vec![
            (crate::pit::ENTITY, Arc::new(arrow::array::Int64Array::from(vec![id])) as arrow::array::ArrayRef),
            (
                crate::pit::TIMESTAMP,
                Arc::new(arrow::array::TimestampMicrosecondArray::from(vec![ts]).with_timezone("UTC")),
            ),
        ])?;
        let lake = self.lake.clone();
        let batch = block_on(async move { crate::pit::FeatureStore::open(&lake).await?.retrieve(&request).await })?;
        table(batch)
    }
}

/// Registers `similar_listings` and `features_at` in a session.
pub fn register(ctx: &SessionContext, lake: &Lake) {
    ctx.register_udtf("similar_listings", Arc::new(SimilarListings { lake: lake.clone() }));
    ctx.register_udtf("features_at", Arc::new(FeaturesAt { lake: lake.clone() }));
}
