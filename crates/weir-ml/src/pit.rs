//! Point-in-time feature retrieval (Feast-style historical retrieval): for each request row
//! (listing_id, ts), the feature version valid at ts — `valid_from <= ts < valid_to` — and
//! never a later one. What depends on the reading instant is computed at ts: the vehicle's
//! age, the days online, and the ratio to the country-and-segment median valid at ts.
//! Request rows come back in their order, with any extra request columns (labels) kept.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::catalog::{MemTable, TableProvider};
use weir_lake::Lake;

use crate::MlError;

pub const ENTITY: &str = "listing_id";
pub const TIMESTAMP: &str = "ts";
const ROW: &str = "__weir_row";
pub const LISTING_FEATURES: &str = "gold.listing_features";
pub const SEGMENT_PRICE: &str = "gold.segment_price";

/// The feature columns returned, after the request's columns.
pub const FEATURE_COLUMNS: [&str; 21] = [
    "feature_valid_from",
    "country",
    "make",
    "model",
    "segment",
    "is_active",
    "seller_kind",
    "fuel",
    "gearbox",
    "mileage_km",
    "power_kw",
    "price_last_eur",
    "log_price",
    "price_per_1000km",
    "price_changes",
    "price_drop_pct",
    "vehicle_age_years",
    "days_online",
    "segment_median_eur",
    "segment_price_ratio",
    "title",
];

/// The feature tables as of when it was opened.
pub struct FeatureStore {
    features: Arc<dyn TableProvider>,
    segments: Arc<dyn TableProvider>,
    tables: Vec<deltalake::DeltaTable>,
    /// Delta versions read (listing_features, segment_price).
    pub versions: (i64, i64),
}

impl std::fmt::Debug for FeatureStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureStore").field("versions", &self.versions).finish()
    }
}

impl FeatureStore {
    pub async fn open(lake: &Lake) -> Result<Self, MlError> {
        let ctx = weir_derive::session::session_context()?;
        let mut providers = Vec::new();
        let mut tables = Vec::new();
        let mut versions = Vec::new();
        for name in [LISTING_FEATURES, SEGMENT_PRICE] {
            let rel = name.replace('.', "/");
            let table = weir_lake::open_table(lake, &rel).await.map_err(weir_derive::DeriveError::from)?;
            let Some(v) = table.version() else {
                return Err(MlError::Missing(format!("{name} is not in the lake yet: run `weir features`")));
            };
            providers.push(weir_derive::session::provider(&ctx, &table, name).await?);
            versions.push(v as i64);
            tables.push(table);
        }
        let segments = providers.pop().expect("two tables");
        let features = providers.pop().expect("two tables");
        Ok(FeatureStore { features, segments, tables, versions: (versions[0], versions[1]) })
    }

    /// The features valid at each request row's timestamp. `requests` needs `listing_id`
    /// (an integer) and `ts` (a timestamp; without a time zone it is read as UTC).
    pub async fn retrieve(&self, requests: &RecordBatch) -> Result<RecordBatch, MlError> {
        let schema = requests.schema();
        let bad = || {
            let got: Vec<String> = schema.fields().iter().map(|f| format!("{} {}", f.name(), f.data_type())).collect();
            MlError::Request(format!(
                "a feature request needs columns {ENTITY} (integer) and {TIMESTAMP} (timestamp); got: {}",
                got.join(", ")
            ))
        };
        let id = requests.column_by_name(ENTITY).ok_or_else(bad)?;
        let ts = requests.column_by_name(TIMESTAMP).ok_or_else(bad)?;
        if !id.data_type().is_integer() || !matches!(ts.data_type(), DataType::Timestamp(..)) {
            return Err(bad());
        }
        for f in schema.fields() {
            if f.name() != ENTITY && FEATURE_COLUMNS.contains(&f.name().as_str()) || f.name() == ROW {
                return Err(MlError::Request(format!(
                    "request column {} has the name of a feature column: rename it",
                    f.name()
                )));
            }
        }
        let utc = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let cast = |a: &ArrayRef, t: &DataType| arrow::compute::cast(a, t).map_err(|e| MlError::Arrow(e.to_string()));
        // The request as sent, ids as bigint, timestamps as µs UTC, plus its row number.
        let mut fields: Vec<Field> = Vec::new();
        let mut cols: Vec<ArrayRef> = Vec::new();
        for (f, c) in schema.fields().iter().zip(requests.columns()) {
            let (t, c) = match f.name().as_str() {
                ENTITY => (DataType::Int64, cast(c, &DataType::Int64)?),
                TIMESTAMP => (utc.clone(), cast(c, &utc)?),
                _ => (f.data_type().clone(), c.clone()),
            };
            fields.push(Field::new(f.name(), t, true));
            cols.push(c);
        }
        fields.push(Field::new(ROW, DataType::UInt64, false));
        cols.push(Arc::new(UInt64Array::from_iter_values(0..requests.num_rows() as u64)));
        let request_schema = Arc::new(Schema::new(fields));
        let batch = RecordBatch::try_new(request_schema.clone(), cols).map_err(|e| MlError::Arrow(e.to_string()))?;

        let ctx = weir_derive::session::session_context()?;
        for t in &self.tables {
            t.update_datafusion_session(&ctx.state()).map_err(|e| MlError::Missing(e.to_string()))?;
        }
        ctx.register_table(LISTING_FEATURES, self.features.clone()).map_err(crate::df("registering the features"))?;
        ctx.register_table(SEGMENT_PRICE, self.segments.clone()).map_err(crate::df("registering the features"))?;
        let mem = MemTable::try_new(request_schema.clone(), vec![vec![batch]]).map_err(crate::df("the request"))?;
        ctx.register_table("__weir_requests", Arc::new(mem)).map_err(crate::df("the request"))?;
        let request_cols = request_schema
            .fields()
            .iter()
            .filter(|f| f.name() != ROW)
            .map(|f| format!("r.\"{}\"", f.name().replace('"', "\"\"")))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {request_cols},
                    f.valid_from AS feature_valid_from,
                    f.country, f.make, f.model, f.segment, f.is_active, f.seller_kind, f.fuel, f.gearbox,
                    f.mileage_km, f.power_kw, f.price_last_eur, f.log_price, f.price_per_1000km, f.price_changes,
                    f.price_drop_pct,
                    CAST(CAST(CAST(r.{TIMESTAMP} AS DATE) AS INT) - CAST(f.first_registration AS INT) AS DOUBLE) / 365.25
                        AS vehicle_age_years,
                    CASE WHEN f.listing_id IS NOT NULL THEN
                    CAST(CAST(CAST(CASE WHEN f.deleted_at < r.{TIMESTAMP} THEN f.deleted_at ELSE r.{TIMESTAMP} END AS DATE) AS INT)
                         - CAST(CAST(f.created_at AS DATE) AS INT) AS INT) END AS days_online,
                    s.median_price_eur AS segment_median_eur,
                    CAST(f.price_last_eur AS DOUBLE) / CAST(s.median_price_eur AS DOUBLE) AS segment_price_ratio,
                    f.title
             FROM __weir_requests r
             LEFT JOIN {LISTING_FEATURES} f
                    ON f.listing_id = r.{ENTITY}
                   AND f.valid_from <= r.{TIMESTAMP} AND (f.valid_to IS NULL OR r.{TIMESTAMP} < f.valid_to)
             LEFT JOIN {SEGMENT_PRICE} s
                    ON s.country = f.country AND s.segment = f.segment
                   AND s.valid_from <= r.{TIMESTAMP} AND (s.valid_to IS NULL OR r.{TIMESTAMP} < s.valid_to)
             ORDER BY r.{ROW}"
        );
        let batches = ctx
            .sql(&sql)
            .await
            .map_err(crate::df("point-in-time retrieval"))?
            .collect()
            .await
            .map_err(crate::df("point-in-time retrieval"))?;
        let out_schema = match batches.first() {
            Some(b) => b.schema(),
            None => return Err(MlError::Arrow("point-in-time retrieval returned no batch".into())),
        };
        let all = arrow::compute::concat_batches(&out_schema, &batches).map_err(|e| MlError::Arrow(e.to_string()))?;
        // Plain string columns for every client (no views).
        let fields: Vec<Field> = out_schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Utf8View | DataType::LargeUtf8 => Field::new(f.name(), DataType::Utf8, true),
                t => Field::new(f.name(), t.clone(), true),
            })
            .collect();
        let cols =
            all.columns().iter().zip(&fields).map(|(c, f)| cast(c, f.data_type())).collect::<Result<Vec<_>, _>>()?;
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(|e| MlError::Arrow(e.to_string()))
    }
}
