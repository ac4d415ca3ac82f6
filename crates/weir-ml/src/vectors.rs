//! The Lance vector table `<lake>/vectors/listings.lance`: one row per listing of the open
//! feature versions (`gold.listing_features`), with its embedding, the price rating and
//! an IVF_PQ index, kept in step incrementally.
//!
//! A refresh compares each listing's open feature version (`valid_from`) with the one its
//! Lance row was built from: changed and new listings are embedded and upserted
//! (merge_insert by listing_id), listings without an open version are deleted, the price
//! rating is recomputed for the (country, make, segment) groups they touch, and the index
//! takes the new rows in (retrained when a third of the rows changed since it was trained).
//! Every step is atomic in Lance and the comparison is made afresh each time, so a refresh
//! killed at any point is completed by the next one: the upserts (in slices) write the new
//! ratings of unchanged listings first and the changed listings last, then the deletes
//! follow, so until a refresh is complete the next one still sees every group it touched.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    Array, ArrayRef, BooleanArray, Decimal128Array, FixedSizeListArray, Float32Array, Float64Array, Int64Array,
    RecordBatch, RecordBatchIterator, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::MemTable;
use futures::TryStreamExt;
use lance::dataset::builder::DatasetBuilder;
use lance::dataset::{Dataset, MergeInsertBuilder, WhenMatched, WhenNotMatched, WriteMode, WriteParams};
use lance::index::DatasetIndexExt;
use lance::index::vector::VectorIndexParams;
use lance::io::ObjectStoreParams;
use lance_index::IndexType;
use lance_linalg::distance::DistanceType;
use weir_lake::Lake;

use crate::MlError;
use crate::embed::{CATEGORICAL, Inputs, Standardization};

/// Where the dataset lives in the lake.
pub const DATASET: &str = "vectors/listings.lance";
/// The feature table it follows.
pub const FEATURES: &str = "gold.listing_features";
pub const INDEX_NAME: &str = "embedding_ivf_pq";
/// The BTree on listing_id: lookups by listing and the upserts' key matching.
pub const KEY_INDEX: &str = "listing_id_btree";
/// Dataset config keys.
const CONFIG_EMBEDDING: &str = "weir.embedding";
const CONFIG_INDEXED_CHANGES: &str = "weir.changes_since_index";
/// Below this many rows a flat search is exact and fast; no index.
pub const MIN_INDEX_ROWS: usize = 4096;
/// Rows per merge_insert commit.
const MERGE_ROWS: usize = 50_000;
/// Fewer valid neighbours than this: no rating.
const MIN_NEIGHBOURS: usize = 3;

#[derive(Debug, Clone)]
pub struct RefreshOptions {
    pub dim: usize,
    /// Neighbours the price rating compares with.
    pub rating_k: usize,
    /// Rebuild from scratch (refits the standardization, retrains the index).
    pub full: bool,
}

impl Default for RefreshOptions {
    fn default() -> Self {
        RefreshOptions { dim: 32, rating_k: 10, full: false }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RefreshReport {
    /// "full", "incremental" or "up to date", with why.
    pub mode: String,
    pub rows: usize,
    pub upserted: usize,
    pub deleted: usize,
    /// Listings whose rating was recomputed (their group changed).
    pub rated: usize,
    /// "trained", "updated", "retrained", "none (N rows)".
    pub index: String,
    pub version: u64,
    pub phases: Vec<(&'static str, Duration)>,
}

/// One row of the vector table, in memory.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    listing_id: i64,
    valid_from: i64,
    country: Option<String>,
    make: Option<String>,
    model: Option<String>,
    segment: Option<String>,
    is_active: bool,
    /// numeric(12,2) as its unscaled value.
    price: Option<i128>,
    embedding: Vec<f32>,
    neighbour_median: Option<f64>,
    rating: Option<f64>,
}

/// Listings rated against each other: (country, make, segment).
type Group = (Option<String>, Option<String>, Option<String>);

impl Row {
    fn group(&self) -> Group {
        (self.country.clone(), self.make.clone(), self.segment.clone())
    }
}

fn lerr(context: impl Into<String>) -> impl FnOnce(lance::Error) -> MlError {
    let context = context.into();
    move |e| MlError::Lance { context, message: e.to_string() }
}

pub fn dataset_uri(lake: &Lake) -> String {
    lake.table_url(DATASET).to_string().trim_end_matches('/').to_string()
}

fn store_params(lake: &Lake) -> ObjectStoreParams {
    ObjectStoreParams {
        storage_options_accessor: (!lake.storage_options().is_empty())
            .then(|| Arc::new(lance::io::StorageOptionsAccessor::with_static_options(lake.storage_options().clone()))),
        ..Default::default()
    }
}

/// The dataset, or None when it was never built.
pub async fn open(lake: &Lake) -> Result<Option<Dataset>, MlError> {
    let uri = dataset_uri(lake);
    match DatasetBuilder::from_uri(&uri).with_storage_options(lake.storage_options().clone()).load().await {
        Ok(ds) => Ok(Some(ds)),
        Err(lance::Error::DatasetNotFound { .. }) => Ok(None),
        Err(e) => Err(lerr(format!("opening {uri}"))(e)),
    }
}

/// What [`cleanup`] removed from the vector table.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cleanup {
    pub versions: u64,
    pub files: u64,
    pub bytes: u64,
}

/// Removes the vector table's versions older than `retain` (never the latest) and the files
/// only they used; nothing when the table was never built.
pub async fn cleanup(lake: &Lake, retain: std::time::Duration) -> Result<Cleanup, MlError> {
    let Some(ds) = open(lake).await? else { return Ok(Cleanup::default()) };
    let older_than = chrono::Duration::from_std(retain).unwrap_or(chrono::Duration::MAX);
    let s = ds
        .cleanup_old_versions(older_than, Some(false), Some(false))
        .await
        .map_err(lerr(format!("cleaning up {}", dataset_uri(lake))))?;
    Ok(Cleanup {
        versions: s.old_versions,
        files: s.data_files_removed + s.transaction_files_removed + s.index_files_removed + s.deletion_files_removed,
        bytes: s.bytes_removed,
    })
}

fn schema(dim: usize) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("listing_id", DataType::Int64, false),
        Field::new("valid_from", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
        Field::new("country", DataType::Utf8, true),
        Field::new("make", DataType::Utf8, true),
        Field::new("model", DataType::Utf8, true),
        Field::new("segment", DataType::Utf8, true),
        Field::new("is_active", DataType::Boolean, false),
        Field::new("price_last_eur", DataType::Decimal128(12, 2), true),
        Field::new("neighbour_median_eur", DataType::Float64, true),
        Field::new("price_rating", DataType::Float64, true),
        Field::new("price_rating_label", DataType::Utf8, true),
        Field::new(
            "embedding",
            DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, true)), dim as i32),
            false,
        ),
    ]))
}

/// The rating's words: below, at or above its neighbours' median (±10 %).
pub fn rating_label(ratio: f64) -> &'static str {
    if ratio < 0.9 {
        "below market"
    } else if ratio > 1.1 {
        "above market"
    } else {
        "at market"
    }
}

fn to_batch(rows: &[&Row], dim: usize) -> Result<RecordBatch, MlError> {
    let strings =
        |f: fn(&Row) -> Option<&str>| -> ArrayRef { Arc::new(rows.iter().map(|r| f(r)).collect::<StringArray>()) };
    let values: Vec<f32> = rows.iter().flat_map(|r| r.embedding.iter().copied()).collect();
    let embedding = FixedSizeListArray::try_new(
        Arc::new(Field::new("item", DataType::Float32, true)),
        dim as i32,
        Arc::new(Float32Array::from(values)),
        None,
    )
    .map_err(|e| MlError::Arrow(e.to_string()))?;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(rows.iter().map(|r| r.listing_id).collect::<Int64Array>()),
        Arc::new(rows.iter().map(|r| Some(r.valid_from)).collect::<TimestampMicrosecondArray>().with_timezone("UTC")),
        strings(|r| r.country.as_deref()),
        strings(|r| r.make.as_deref()),
        strings(|r| r.model.as_deref()),
        strings(|r| r.segment.as_deref()),
        Arc::new(rows.iter().map(|r| Some(r.is_active)).collect::<BooleanArray>()),
        Arc::new(
            rows.iter()
                .map(|r| r.price)
                .collect::<Decimal128Array>()
                .with_precision_and_scale(12, 2)
                .map_err(|e| MlError::Arrow(e.to_string()))?,
        ),
        Arc::new(rows.iter().map(|r| r.neighbour_median).collect::<Float64Array>()),
        Arc::new(rows.iter().map(|r| r.rating).collect::<Float64Array>()),
        Arc::new(rows.iter().map(|r| r.rating.map(rating_label)).collect::<StringArray>()),
        Arc::new(embedding),
    ];
    RecordBatch::try_new(schema(dim), columns).map_err(|e| MlError::Arrow(e.to_string()))
}

fn strings_of(b: &RecordBatch, name: &str) -> Result<Vec<Option<String>>, MlError> {
    let c = b.column_by_name(name).ok_or_else(|| MlError::Arrow(format!("no column {name}")))?;
    let c = arrow::compute::cast(c, &DataType::Utf8).map_err(|e| MlError::Arrow(e.to_string()))?;
    let s = c.as_any().downcast_ref::<StringArray>().ok_or_else(|| MlError::Arrow(format!("{name} is not text")))?;
    Ok(s.iter().map(|v| v.map(str::to_string)).collect())
}

/// A column cast to `want`.
fn column_as(b: &RecordBatch, name: &str, want: &DataType) -> Result<ArrayRef, MlError> {
    let c = b.column_by_name(name).ok_or_else(|| MlError::Arrow(format!("no column {name}")))?;
    if c.data_type() == want {
        Ok(c.clone())
    } else {
        arrow::compute::cast(c, want).map_err(|e| MlError::Arrow(format!("{name}: {e}")))
    }
}

fn i64s(b: &RecordBatch, name: &str) -> Result<Vec<Option<i64>>, MlError> {
    let c = column_as(b, name, &DataType::Int64)?;
    Ok(c.as_any().downcast_ref::<Int64Array>().expect("cast to Int64").iter().collect())
}

fn f64s(b: &RecordBatch, name: &str) -> Result<Vec<Option<f64>>, MlError> {
    let c = column_as(b, name, &DataType::Float64)?;
    Ok(c.as_any().downcast_ref::<Float64Array>().expect("cast to Float64").iter().collect())
}

fn micros(b: &RecordBatch, name: &str) -> Result<Vec<Option<i64>>, MlError> {
    let want = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let c = column_as(b, name, &want)?;
    Ok(c.as_any().downcast_ref::<TimestampMicrosecondArray>().expect("cast to timestamp").iter().collect())
}

fn bools(b: &RecordBatch, name: &str) -> Result<Vec<Option<bool>>, MlError> {
    let c = column_as(b, name, &DataType::Boolean)?;
    Ok(c.as_any().downcast_ref::<BooleanArray>().expect("cast to bool").iter().collect())
}

fn prices(b: &RecordBatch, name: &str) -> Result<Vec<Option<i128>>, MlError> {
    let c = column_as(b, name, &DataType::Decimal128(12, 2))?;
    Ok(c.as_any().downcast_ref::<Decimal128Array>().expect("cast to decimal").iter().collect())
}

/// The open feature versions (all, or only `keys`), as rows to embed plus their numeric
/// embedding inputs.
async fn open_features(
    session: &weir_derive::LakeSession,
    keys: Option<&[i64]>,
) -> Result<(Vec<Row>, Vec<[f64; crate::embed::N]>, Vec<FeatureText>), MlError> {
    let mut sql = format!(
        "SELECT f.listing_id, f.valid_from, f.country, f.make, f.model, f.segment, f.is_active, f.seller_kind, f.fuel,
                f.gearbox, f.title, f.price_last_eur,
                CAST(date_part('year', f.first_registration) AS DOUBLE) AS registration_year,
                ln(1 + CAST(f.mileage_km AS DOUBLE)) AS log_mileage,
                CAST(f.power_kw AS DOUBLE) AS power_kw
         FROM {FEATURES} f"
    );
    if let Some(keys) = keys {
        let batch = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("listing_id", DataType::Int64, false)])),
            vec![Arc::new(Int64Array::from(keys.to_vec()))],
        )
        .map_err(|e| MlError::Arrow(e.to_string()))?;
        let table = MemTable::try_new(batch.schema(), vec![vec![batch]]).map_err(crate::df("the changed keys"))?;
        let _ = session.ctx.deregister_table("__weir_keys");
        session.ctx.register_table("__weir_keys", Arc::new(table)).map_err(crate::df("the changed keys"))?;
        sql.push_str(" JOIN __weir_keys k ON k.listing_id = f.listing_id");
    }
    sql.push_str(" WHERE f.valid_to IS NULL");
    let batches = session
        .ctx
        .sql(&sql)
        .await
        .map_err(crate::df("reading the open feature versions"))?
        .collect()
        .await
        .map_err(crate::df("reading the open feature versions"))?;
    let (mut rows, mut numeric, mut texts) = (Vec::new(), Vec::new(), Vec::new());
    for b in &batches {
        let [seller, fuel, gearbox, title] = ["seller_kind", "fuel", "gearbox", "title"].map(|n| strings_of(b, n));
        let (seller, fuel, gearbox, title) = (seller?, fuel?, gearbox?, title?);
        let nums: Vec<Vec<Option<f64>>> = crate::embed::NUMERIC.iter().map(|n| f64s(b, n)).collect::<Result<_, _>>()?;
        for (i, row) in base_rows(b)?.into_iter().enumerate() {
            let Some(row) = row else { continue };
            rows.push(row);
            let mut x = [f64::NAN; crate::embed::N];
            for (j, n) in nums.iter().enumerate() {
                x[j] = n[i].unwrap_or(f64::NAN);
            }
            numeric.push(x);
            texts.push(FeatureText {
                seller_kind: seller[i].clone(),
                fuel: fuel[i].clone(),
                gearbox: gearbox[i].clone(),
                title: title[i].clone(),
            });
        }
    }
    Ok((rows, numeric, texts))
}

/// The columns the feature table and the vector table share, as rows without embedding or
/// rating (None where listing_id or valid_from is NULL).
fn base_rows(b: &RecordBatch) -> Result<Vec<Option<Row>>, MlError> {
    let ids = i64s(b, "listing_id")?;
    let from = micros(b, "valid_from")?;
    let [country, make, model, segment] = ["country", "make", "model", "segment"].map(|n| strings_of(b, n));
    let (country, make, model, segment) = (country?, make?, model?, segment?);
    let active = bools(b, "is_active")?;
    let price = prices(b, "price_last_eur")?;
    Ok((0..b.num_rows())
        .map(|i| {
            Some(Row {
                listing_id: ids[i]?,
                valid_from: from[i]?,
                country: country[i].clone(),
                make: make[i].clone(),
                model: model[i].clone(),
                segment: segment[i].clone(),
                is_active: active[i].unwrap_or(false),
                price: price[i],
                embedding: vec![],
                neighbour_median: None,
                rating: None,
            })
        })
        .collect())
}

/// A session with the feature table registered.
async fn features_session(lake: &Lake) -> Result<weir_derive::LakeSession, MlError> {
    let mut session = weir_derive::LakeSession::open(lake, &[]).await?;
    if session.register_delta(lake, FEATURES).await?.is_none() {
        return Err(MlError::Missing(format!(
            "{FEATURES} is not in the lake yet: run `weir features` (it derives it)"
        )));
    }
    Ok(session)
}

/// The text inputs not kept in the vector table.
#[derive(Debug, Clone)]
struct FeatureText {
    seller_kind: Option<String>,
    fuel: Option<String>,
    gearbox: Option<String>,
    title: Option<String>,
}

fn embed_rows(stats: &Standardization, rows: &mut [Row], numeric: &[[f64; crate::embed::N]], texts: &[FeatureText]) {
    for ((r, x), t) in rows.iter_mut().zip(numeric).zip(texts) {
        let categorical = [
            r.country.as_deref(),
            r.make.as_deref(),
            r.model.as_deref(),
            r.segment.as_deref(),
            t.fuel.as_deref(),
            t.gearbox.as_deref(),
            t.seller_kind.as_deref(),
        ];
        debug_assert_eq!(categorical.len(), CATEGORICAL.len());
        r.embedding = stats.embed(&Inputs { numeric: *x, categorical, title: t.title.as_deref() });
    }
}

/// Recomputes the price rating of every row in `groups` (all groups when None): the median
/// EUR price of its `k` nearest active, priced neighbours in the same country, make and
/// segment, by exact distance (ties by listing_id). Groups are rated in parallel. Returns
/// how many rows were rated.
fn rate(rows: &mut [Row], groups: Option<&BTreeSet<Group>>, k: usize) -> usize {
    let mut by_group: BTreeMap<Group, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        let g = r.group();
        if groups.is_none_or(|s| s.contains(&g)) {
            by_group.entry(g).or_default().push(i);
        }
    }
    let members: Vec<Vec<usize>> = by_group.into_values().collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(members.len().max(1));
    let shared: &[Row] = rows;
    // Largest groups first, dealt round-robin: the threads finish together.
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by_key(|&g| std::cmp::Reverse(members[g].len()));
    let results: Vec<Vec<Rated>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<&Vec<usize>> = order.iter().skip(t).step_by(threads).map(|&g| &members[g]).collect();
                scope.spawn(move || mine.into_iter().flat_map(|m| rate_group(shared, m, k)).collect::<Vec<_>>())
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a rating thread panicked")).collect()
    });
    let mut rated = 0;
    for (i, median, rating) in results.into_iter().flatten() {
        rows[i].neighbour_median = median;
        rows[i].rating = rating;
        rated += 1;
    }
    rated
}

/// (row, neighbours' median, rating).
type Rated = (usize, Option<f64>, Option<f64>);

/// [`Rated`] for every member of one group.
fn rate_group(rows: &[Row], members: &[usize], k: usize) -> Vec<Rated> {
    let candidates: Vec<usize> =
        members.iter().copied().filter(|&j| rows[j].is_active && rows[j].price.is_some()).collect();
    let mut out = Vec::with_capacity(members.len());
    // The k nearest so far, the farthest on top: (distance, listing_id, price).
    let mut near: BinaryHeap<(OrdF32, i64, i128)> = BinaryHeap::with_capacity(k + 1);
    for &i in members {
        let me = &rows[i];
        near.clear();
        for &j in &candidates {
            if j == i {
                continue;
            }
            let item = (OrdF32(crate::embed::l2(&me.embedding, &rows[j].embedding)), rows[j].listing_id);
            if near.len() < k || near.peek().is_some_and(|top| item < (top.0, top.1)) {
                if near.len() == k {
                    near.pop();
                }
                near.push((item.0, item.1, rows[j].price.unwrap_or_default()));
            }
        }
        let (median, rating) = match (me.price, near.len() >= MIN_NEIGHBOURS) {
            (Some(p), true) => {
                let mut ps: Vec<i128> = near.iter().map(|n| n.2).collect();
                ps.sort_unstable();
                let m = ps.len();
                let median =
                    if m % 2 == 1 { ps[m / 2] as f64 } else { (ps[m / 2 - 1] + ps[m / 2]) as f64 / 2.0 } / 100.0;
                if median > 0.0 { (Some(median), Some((p as f64 / 100.0) / median)) } else { (None, None) }
            }
            _ => (None, None),
        };
        out.push((i, median, rating));
    }
    out
}

/// An f32 ordered by `total_cmp`, for the neighbour heap.
#[derive(Debug, Clone, Copy, PartialEq)]
struct OrdF32(f32);

impl Eq for OrdF32 {}

impl PartialOrd for OrdF32 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrdF32 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Brings the vector table in step with the open feature versions.
pub async fn refresh(lake: &Lake, opts: &RefreshOptions) -> Result<RefreshReport, MlError> {
    crate::embed::check_dimension(opts.dim).map_err(|e| MlError::Config(e.to_string()))?;
    let existing = open(lake).await?;
    let stats = existing
        .as_ref()
        .and_then(|ds| ds.config().get(CONFIG_EMBEDDING).and_then(|s| serde_json::from_str::<Standardization>(s).ok()));
    let why_full = match (&existing, &stats) {
        _ if opts.full => Some("--full".to_string()),
        (None, _) => Some("first build".to_string()),
        (Some(_), None) => Some("the dataset has no recorded standardization".to_string()),
        (Some(_), Some(s)) if s.dim != opts.dim => {
            Some(format!("the dimension changed from {} to {}", s.dim, opts.dim))
        }
        _ => None,
    };
    match (why_full, existing, stats) {
        (Some(why), existing, _) => full(lake, opts, existing.is_some(), why).await,
        (None, Some(ds), Some(stats)) => incremental(lake, opts, ds, stats).await,
        _ => unreachable!("a dataset without standardization is rebuilt"),
    }
}

async fn full(lake: &Lake, opts: &RefreshOptions, exists: bool, why: String) -> Result<RefreshReport, MlError> {
    let mut phases = Vec::new();
    let t = Instant::now();
    let (mut rows, numeric, texts) = open_features(&features_session(lake).await?, None).await?;
    phases.push(("read features", t.elapsed()));
    let t = Instant::now();
    let stats = Standardization::fit(opts.dim, numeric.iter());
    embed_rows(&stats, &mut rows, &numeric, &texts);
    phases.push(("embed", t.elapsed()));
    let t = Instant::now();
    let rated = rate(&mut rows, None, opts.rating_k);
    phases.push(("rate", t.elapsed()));
    let t = Instant::now();
    rows.sort_by_key(|r| r.listing_id);
    let refs: Vec<&Row> = rows.iter().collect();
    let batches: Vec<Result<RecordBatch, arrow::error::ArrowError>> = refs
        .chunks(65_536)
        .map(|c| to_batch(c, opts.dim).map_err(|e| arrow::error::ArrowError::ComputeError(e.to_string())))
        .collect();
    let reader = RecordBatchIterator::new(batches, schema(opts.dim));
    let params = WriteParams {
        mode: if exists { WriteMode::Overwrite } else { WriteMode::Create },
        store_params: Some(store_params(lake)),
        ..Default::default()
    };
    let uri = dataset_uri(lake);
    let mut ds = Dataset::write(reader, uri.as_str(), Some(params)).await.map_err(lerr(format!("writing {uri}")))?;
    phases.push(("write", t.elapsed()));
    let t = Instant::now();
    ds.create_index(
        &["listing_id"],
        IndexType::BTree,
        Some(KEY_INDEX.to_string()),
        &lance_index::scalar::ScalarIndexParams::default(),
        true,
    )
    .await
    .map_err(lerr("indexing listing_id"))?;
    let index = if rows.len() >= MIN_INDEX_ROWS {
        train_index(&mut ds, rows.len(), opts.dim).await?;
        "trained".to_string()
    } else {
        format!("none ({} rows: flat search is exact)", rows.len())
    };
    phases.push(("index", t.elapsed()));
    let stats_json = serde_json::to_string(&stats).map_err(|e| MlError::Config(e.to_string()))?;
    ds.update_config([(CONFIG_EMBEDDING, stats_json.as_str()), (CONFIG_INDEXED_CHANGES, "0")])
        .await
        .map_err(lerr("recording the standardization"))?;
    Ok(RefreshReport {
        mode: format!("full ({why})"),
        rows: rows.len(),
        upserted: rows.len(),
        deleted: 0,
        rated,
        index,
        version: ds.version().version,
        phases,
    })
}

/// IVF_PQ over the embedding: √n partitions, dim/4 sub-vectors of 8 bits, L2.
async fn train_index(ds: &mut Dataset, rows: usize, dim: usize) -> Result<(), MlError> {
    let partitions = ((rows as f64).sqrt() / 2.0).round().clamp(1.0, 4096.0) as usize;
    let params = VectorIndexParams::ivf_pq(partitions, 8, dim / 4, DistanceType::L2, 50);
    ds.create_index(&["embedding"], IndexType::Vector, Some(INDEX_NAME.to_string()), &params, true)
        .await
        .map_err(lerr("training the IVF_PQ index"))?;
    Ok(())
}

/// Every row of the dataset, in memory.
async fn read_all(ds: &Dataset) -> Result<Vec<Row>, MlError> {
    let batches: Vec<RecordBatch> = ds
        .scan()
        .try_into_stream()
        .await
        .map_err(lerr("reading the vector table"))?
        .try_collect()
        .await
        .map_err(lerr("reading the vector table"))?;
    let mut rows = Vec::new();
    for b in &batches {
        let median = f64s(b, "neighbour_median_eur")?;
        let rating = f64s(b, "price_rating")?;
        let emb = b
            .column_by_name("embedding")
            .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>())
            .ok_or_else(|| MlError::Arrow("the embedding column is not a fixed-size list".into()))?;
        let dim = emb.value_length() as usize;
        let values = emb
            .values()
            .as_any()
            .downcast_ref::<Float32Array>()
            .ok_or_else(|| MlError::Arrow("the embedding is not float32".into()))?;
        let offset = emb.offset() * dim;
        for (i, row) in base_rows(b)?.into_iter().enumerate() {
            let Some(row) = row else { continue };
            rows.push(Row {
                embedding: values.values()[offset + i * dim..offset + (i + 1) * dim].to_vec(),
                neighbour_median: median[i],
                rating: rating[i],
                ..row
            });
        }
    }
    Ok(rows)
}

/// (listing_id, valid_from) of every open feature version.
async fn open_versions(session: &weir_derive::LakeSession) -> Result<HashMap<i64, i64>, MlError> {
    let batches = session
        .ctx
        .sql(&format!("SELECT listing_id, valid_from FROM {FEATURES} WHERE valid_to IS NULL"))
        .await
        .map_err(crate::df("reading the open feature versions"))?
        .collect()
        .await
        .map_err(crate::df("reading the open feature versions"))?;
    let mut out = HashMap::new();
    for b in &batches {
        for (id, from) in i64s(b, "listing_id")?.into_iter().zip(micros(b, "valid_from")?) {
            if let (Some(id), Some(from)) = (id, from) {
                out.insert(id, from);
            }
        }
    }
    Ok(out)
}

async fn incremental(
    lake: &Lake,
    opts: &RefreshOptions,
    ds: Dataset,
    stats: Standardization,
) -> Result<RefreshReport, MlError> {
    let mut phases = Vec::new();
    let t = Instant::now();
    let session = features_session(lake).await?;
    let open = open_versions(&session).await?;
    let mut rows = read_all(&ds).await?;
    let stored: HashMap<i64, i64> = rows.iter().map(|r| (r.listing_id, r.valid_from)).collect();
    let mut changed: Vec<i64> =
        open.iter().filter(|(id, from)| stored.get(id) != Some(from)).map(|(id, _)| *id).collect();
    changed.sort_unstable();
    let gone: Vec<i64> = stored.keys().filter(|id| !open.contains_key(id)).copied().collect();
    phases.push(("compare", t.elapsed()));
    if changed.is_empty() && gone.is_empty() {
        return Ok(RefreshReport {
            mode: "up to date (every listing's open feature version is embedded)".into(),
            rows: rows.len(),
            index: "unchanged".into(),
            version: ds.version().version,
            phases,
            ..Default::default()
        });
    }
    let t = Instant::now();
    let (mut fresh, numeric, texts) = open_features(&session, Some(&changed)).await?;
    embed_rows(&stats, &mut fresh, &numeric, &texts);
    phases.push(("read + embed changes", t.elapsed()));
    let t = Instant::now();
    // The groups touched: where the changed and deleted listings were and are now.
    let touched_ids: BTreeSet<i64> = changed.iter().chain(&gone).copied().collect();
    let mut groups: BTreeSet<_> = rows.iter().filter(|r| touched_ids.contains(&r.listing_id)).map(Row::group).collect();
    groups.extend(fresh.iter().map(Row::group));
    let before: HashMap<i64, (Option<f64>, Option<f64>)> =
        rows.iter().map(|r| (r.listing_id, (r.neighbour_median, r.rating))).collect();
    rows.retain(|r| !touched_ids.contains(&r.listing_id));
    rows.extend(fresh);
    let rated = rate(&mut rows, Some(&groups), opts.rating_k);
    let changed_set: BTreeSet<i64> = changed.iter().copied().collect();
    let mut write: Vec<&Row> = rows
        .iter()
        .filter(|r| {
            changed_set.contains(&r.listing_id) || before.get(&r.listing_id) != Some(&(r.neighbour_median, r.rating))
        })
        .collect();
    // New ratings of unchanged listings first, the changed listings last: until the last of
    // them is written, the next refresh still sees every touched group as changed.
    write.sort_by_key(|r| changed_set.contains(&r.listing_id));
    phases.push(("rate", t.elapsed()));
    let t = Instant::now();
    let mut ds = Arc::new(ds);
    // In slices: Lance's merge holds its source in a fixed memory pool (100 MB by default).
    // Each slice is its own commit; a refresh killed between them is completed by the next.
    for slice in write.chunks(MERGE_ROWS) {
        let batch = to_batch(slice, opts.dim)?;
        let reader = RecordBatchIterator::new(std::iter::once(Ok(batch)), schema(opts.dim));
        let mut builder = MergeInsertBuilder::try_new(ds.clone(), vec!["listing_id".to_string()])
            .map_err(lerr("merging into the vector table"))?;
        builder.when_matched(WhenMatched::UpdateAll).when_not_matched(WhenNotMatched::InsertAll);
        let job = builder.try_build().map_err(lerr("merging into the vector table"))?;
        let (merged, _) = job.execute_reader(reader).await.map_err(lerr("merging into the vector table"))?;
        ds = merged;
    }
    let mut ds = Arc::try_unwrap(ds).unwrap_or_else(|a| (*a).clone());
    for chunk in gone.chunks(1000) {
        let list = chunk.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
        ds.delete(&format!("listing_id IN ({list})")).await.map_err(lerr("deleting from the vector table"))?;
    }
    phases.push(("merge + delete", t.elapsed()));
    let t = Instant::now();
    if ds.count_fragments() > 32 {
        lance::dataset::optimize::compact_files(&mut ds, Default::default(), None)
            .await
            .map_err(lerr("compacting the vector table"))?;
    }
    phases.push(("compact", t.elapsed()));
    let t = Instant::now();
    let since: usize =
        ds.config().get(CONFIG_INDEXED_CHANGES).and_then(|v| v.parse().ok()).unwrap_or(0) + changed.len() + gone.len();
    let has_index = ds.load_indices().await.map_err(lerr("reading the indices"))?.iter().any(|i| i.name == INDEX_NAME);
    // New rows into every index (the listing_id BTree, the vectors' partitions) and the
    // vector index trained again once the data has drifted far enough.
    ds.optimize_indices(&Default::default()).await.map_err(lerr("adding new rows to the indices"))?;
    let (index, since) = if rows.len() < MIN_INDEX_ROWS {
        (format!("none ({} rows: flat search is exact)", rows.len()), 0)
    } else if !has_index || since * 3 > rows.len() {
        train_index(&mut ds, rows.len(), opts.dim).await?;
        (
            if has_index {
                format!("retrained ({since} rows changed since the last training)")
            } else {
                "trained".into()
            },
            0,
        )
    } else {
        ("updated (new rows added to the index)".to_string(), since)
    };
    ds.update_config([(CONFIG_INDEXED_CHANGES, since.to_string().as_str())])
        .await
        .map_err(lerr("recording the index state"))?;
    phases.push(("index", t.elapsed()));
    Ok(RefreshReport {
        mode: format!("incremental ({} listings changed, {} gone)", changed.len(), gone.len()),
        rows: rows.len(),
        upserted: write.len(),
        deleted: gone.len(),
        rated,
        index,
        version: ds.version().version,
        phases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, price: Option<i128>, x: f32, active: bool) -> Row {
        Row {
            listing_id: id,
            valid_from: 0,
            country: Some("DE".into()),
            make: Some("vw".into()),
            model: None,
            segment: Some("compact".into()),
            is_active: active,
            price,
            embedding: vec![x, 0.0],
            neighbour_median: None,
            rating: None,
        }
    }

    #[test]
    fn rating_is_the_price_over_the_median_of_the_nearest_active_neighbours() {
        // Neighbours of listing 1 (at 0.0) by distance: 2 (0.1), 3 (0.2), 4 (0.3, inactive), 5 (0.4), 6 (9.0).
        let mut rows = vec![
            row(1, Some(1_200_000), 0.0, true),
            row(2, Some(1_000_000), 0.1, true),
            row(3, Some(1_100_000), 0.2, true),
            row(4, Some(1_00), 0.3, false),
            row(5, Some(900_000), 0.4, true),
            row(6, Some(9_900_000), 9.0, true),
        ];
        let rated = rate(&mut rows, None, 3);
        assert_eq!(rated, 6);
        assert_eq!(rows[0].neighbour_median, Some(10_000.0), "median of 10k, 11k, 9k; the inactive one skipped");
        assert_eq!(rows[0].rating, Some(1.2));
        assert_eq!(rating_label(1.2), "above market");
        // Another group is not a neighbour; too few neighbours: no rating.
        let mut other = row(7, Some(500_000), 0.0, true);
        other.country = Some("FR".into());
        rows.push(other);
        rate(&mut rows, None, 3);
        assert_eq!(rows[6].rating, None);
        assert_eq!(rows[0].rating, Some(1.2));
    }
}
