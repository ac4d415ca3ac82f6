//! Nearest-neighbour search over the vector table: by a listing's embedding or by a
//! vector, k results, an optional filter (Lance SQL, applied before the top k), the
//! approximate index or an exact flat scan.

use std::sync::Arc;

use arrow::array::{Array, Float32Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use futures::TryStreamExt;
use lance::dataset::Dataset;

use crate::MlError;
use crate::vectors::DATASET;

/// What the search is near.
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    /// This listing's embedding; the listing itself is left out of the results.
    Listing(i64),
    Vector(Vec<f32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct SimilarRequest {
    pub query: Query,
    pub k: usize,
    /// e.g. `country = 'DE' AND is_active`.
    pub filter: Option<String>,
    /// Columns besides listing_id and distance; empty: [`DEFAULT_COLUMNS`].
    pub columns: Vec<String>,
    /// A flat scan over every row instead of the index (exact).
    pub exact: bool,
}

pub const DEFAULT_COLUMNS: [&str; 7] =
    ["country", "make", "model", "is_active", "price_last_eur", "price_rating", "price_rating_label"];
/// IVF partitions probed and the refine factor (candidates re-ranked by exact distance).
pub const NPROBES: usize = 16;
pub const REFINE: u32 = 10;
pub const MAX_K: usize = 1000;

fn lerr(context: &str) -> impl FnOnce(lance::Error) -> MlError + '_ {
    move |e| MlError::Lance { context: context.to_string(), message: e.to_string() }
}

/// A search error; one the filter caused names the filter, without Lance's source location.
fn search_err(filter: &Option<String>) -> impl Fn(lance::Error) -> MlError + '_ {
    move |e| {
        let text = e.to_string();
        let text = text.split(", /").next().unwrap_or(&text).to_string();
        match filter {
            Some(f) if matches!(e, lance::Error::InvalidInput { .. }) => {
                MlError::Request(format!("filter {f:?}: {}", text.trim_start_matches("Invalid user input: ")))
            }
            _ => MlError::Lance { context: "searching".into(), message: text },
        }
    }
}

/// A listing's embedding.
pub async fn embedding_of(ds: &Dataset, listing_id: i64) -> Result<Vec<f32>, MlError> {
    let mut scan = ds.scan();
    scan.filter(&format!("listing_id = {listing_id}"))
        .and_then(|s| s.project(&["embedding"]))
        .map_err(lerr("looking up a listing"))?;
    let batches: Vec<RecordBatch> = scan
        .try_into_stream()
        .await
        .map_err(lerr("looking up a listing"))?
        .try_collect()
        .await
        .map_err(lerr("looking up a listing"))?;
    let list = batches
        .iter()
        .find(|b| b.num_rows() > 0)
        .and_then(|b| b.column(0).as_any().downcast_ref::<arrow::array::FixedSizeListArray>().cloned())
        .ok_or_else(|| MlError::Request(format!("listing {listing_id} is not in {DATASET}")))?;
    let values = list.value(0);
    let values = values
        .as_any()
        .downcast_ref::<Float32Array>()
        .ok_or_else(|| MlError::Arrow("the embedding is not float32".into()))?;
    Ok(values.values().to_vec())
}

/// The k nearest listings: listing_id, distance (squared L2), then the chosen columns,
/// nearest first.
pub async fn similar(ds: &Dataset, req: &SimilarRequest) -> Result<RecordBatch, MlError> {
    if req.k == 0 || req.k > MAX_K {
        return Err(MlError::Request(format!("k must be from 1 to {MAX_K}, not {}", req.k)));
    }
    let schema = ds.schema();
    let columns: Vec<String> = if req.columns.is_empty() {
        DEFAULT_COLUMNS.iter().map(|c| c.to_string()).collect()
    } else {
        req.columns.clone()
    };
    for c in &columns {
        if schema.field(c).is_none() || c == "listing_id" {
            if c == "listing_id" {
                continue;
            }
            let names: Vec<String> = schema.fields.iter().map(|f| f.name.clone()).collect();
            return Err(MlError::Request(format!("unknown column {c:?} (columns: {})", names.join(", "))));
        }
    }
    let columns: Vec<String> = columns.into_iter().filter(|c| c != "listing_id").collect();
    let (vector, exclude) = match &req.query {
        Query::Listing(id) => (embedding_of(ds, *id).await?, Some(*id)),
        Query::Vector(v) => (v.clone(), None),
    };
    let dim = schema
        .field("embedding")
        .and_then(|f| match f.data_type() {
            DataType::FixedSizeList(_, n) => Some(n as usize),
            _ => None,
        })
        .ok_or_else(|| MlError::Arrow("the dataset has no embedding column".into()))?;
    if vector.len() != dim {
        return Err(MlError::Request(format!("the query vector has {} values; the embedding has {dim}", vector.len())));
    }
    // The listing itself is dropped from the results afterwards (one more is asked for):
    // a filter on it would turn every search into a prefiltered one.
    let filter = req.filter.clone();
    let q = Float32Array::from(vector);
    let mut scan = ds.scan();
    let mut project: Vec<&str> = vec!["listing_id", "_distance"];
    project.extend(columns.iter().map(String::as_str));
    scan.disable_scoring_autoprojection();
    scan.project(&project).map_err(lerr("planning the search"))?;
    scan.nearest("embedding", &q, req.k + usize::from(exclude.is_some())).map_err(lerr("planning the search"))?;
    if let Some(f) = &filter {
        scan.filter(f).map_err(|e| match search_err(&filter)(e) {
            MlError::Lance { message, .. } => MlError::Request(format!("filter {f:?}: {message}")),
            other => other,
        })?;
        scan.prefilter(true);
    }
    if req.exact {
        scan.use_index(false);
    } else {
        scan.nprobes(NPROBES).refine(REFINE);
    }
    let batches: Vec<RecordBatch> =
        scan.try_into_stream().await.map_err(search_err(&filter))?.try_collect().await.map_err(search_err(&filter))?;
    let out_schema = Arc::new(Schema::new(
        std::iter::once(Field::new("listing_id", DataType::Int64, false))
            .chain(std::iter::once(Field::new("distance", DataType::Float32, true)))
            .chain(columns.iter().map(|c| {
                let f = schema.field(c).expect("checked above");
                Field::new(c, f.data_type(), true)
            }))
            .collect::<Vec<_>>(),
    ));
    let mut parts = Vec::new();
    for b in &batches {
        let mut cols = vec![
            b.column_by_name("listing_id").cloned().ok_or_else(|| MlError::Arrow("no listing_id".into()))?,
            b.column_by_name("_distance").cloned().ok_or_else(|| MlError::Arrow("no _distance".into()))?,
        ];
        for c in &columns {
            cols.push(b.column_by_name(c).cloned().ok_or_else(|| MlError::Arrow(format!("no column {c}")))?);
        }
        parts.push(RecordBatch::try_new(out_schema.clone(), cols).map_err(|e| MlError::Arrow(e.to_string()))?);
    }
    let all = arrow::compute::concat_batches(&out_schema, &parts).map_err(|e| MlError::Arrow(e.to_string()))?;
    // Nearest first, ties by listing_id: the same answer every time.
    let ids = all.column(0).as_any().downcast_ref::<arrow::array::Int64Array>().expect("listing_id");
    let d = all.column(1).as_any().downcast_ref::<Float32Array>().expect("distance");
    let mut order: Vec<usize> = (0..all.num_rows()).filter(|&i| Some(ids.value(i)) != exclude).collect();
    order.sort_by(|&a, &b| d.value(a).total_cmp(&d.value(b)).then(ids.value(a).cmp(&ids.value(b))));
    order.truncate(req.k);
    let idx = arrow::array::UInt32Array::from(order.iter().map(|&i| i as u32).collect::<Vec<_>>());
    arrow::compute::take_record_batch(&all, &idx).map_err(|e| MlError::Arrow(e.to_string()))
}
