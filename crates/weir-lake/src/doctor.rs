//! `weir doctor`: can this lake hold Weir's tables? Each check writes under
//! `_weir/doctor/<run>/` and removes what it wrote.

use std::sync::Arc;
use std::time::Instant;

use arrow_array::{Int64Array, RecordBatch, RecordBatchIterator, StringArray};
use arrow_schema::{DataType, Field, Schema};
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use futures::StreamExt;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::store::Lake;

/// The outcome of one check.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    pub millis: u128,
}

/// Runs every check; a failed check does not stop the others.
pub async fn run_checks(lake: &Lake) -> Vec<Check> {
    let run = format!(
        "{}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    );
    let base = format!("_weir/doctor/{run}");
    let mut out = Vec::new();
    out.push(timed("object store read/write", round_trip(lake, &base)).await);
    out.push(timed("conditional create has one winner", one_winner(lake, &base)).await);
    out.push(timed("Delta write + DataFusion read", delta_round_trip(lake, &base)).await);
    out.push(timed("Lance write + read", lance_round_trip(lake, &base)).await);
    if let Err(e) = cleanup(lake, &base).await {
        out.push(Check { name: "clean-up", ok: false, detail: e, millis: 0 });
    }
    out
}

async fn timed(name: &'static str, f: impl Future<Output = Result<String, String>>) -> Check {
    let t = Instant::now();
    let r = f.await;
    let millis = t.elapsed().as_millis();
    match r {
        Ok(detail) => Check { name, ok: true, detail, millis },
        Err(detail) => Check { name, ok: false, detail, millis },
    }
}

async fn round_trip(lake: &Lake, base: &str) -> Result<String, String> {
    let store = lake.store();
    let path = lake.path(&format!("{base}/probe"));
    let body = b"weir doctor probe".to_vec();
    store.put(&path, PutPayload::from(body.clone())).await.map_err(|e| format!("put {path}: {e}"))?;
    let got =
        store.get(&path).await.map_err(|e| format!("get {path}: {e}"))?.bytes().await.map_err(|e| e.to_string())?;
    if got.as_ref() != body.as_slice() {
        return Err(format!("read back {} bytes that differ from the {} written", got.len(), body.len()));
    }
    Ok(format!("{} bytes written and read back", body.len()))
}

/// Delta's commit protocol needs put-if-absent with exactly one winner.
async fn one_winner(lake: &Lake, base: &str) -> Result<String, String> {
    let store = lake.store();
    let path = lake.path(&format!("{base}/commit.json"));
    let racers = 8;
    let mut tasks = Vec::new();
    for i in 0..racers {
        let (store, path) = (store.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
            store.put_opts(&path, PutPayload::from(format!("writer {i}")), opts).await
        }));
    }
    let (mut won, mut lost, mut other) = (0, 0, Vec::new());
    for t in tasks {
        match t.await.map_err(|e| e.to_string())? {
            Ok(_) => won += 1,
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => lost += 1,
            Err(e) => other.push(e.to_string()),
        }
    }
    if !other.is_empty() {
        return Err(format!("conditional put failed: {}", other.join("; ")));
    }
    if won != 1 {
        return Err(format!(
            "{won} of {racers} concurrent create-if-absent writers won; Delta commits on this store are unsafe"
        ));
    }
    Ok(format!("1 of {racers} concurrent writers won, {lost} refused"))
}

fn probe_batch() -> RecordBatch {
    let schema =
        Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false), Field::new("name", DataType::Utf8, true)]));
    RecordBatch::try_new(
        schema,
        vec![Arc::new(Int64Array::from(vec![1, 2, 3])), Arc::new(StringArray::from(vec![Some("a"), None, Some("🚗")]))],
    )
    .expect("static batch")
}

async fn delta_round_trip(lake: &Lake, base: &str) -> Result<String, String> {
    let url = lake.table_url(&format!("{base}/delta"));
    lake.prepare_table_dir(&format!("{base}/delta")).map_err(|e| e.to_string())?;
    let table = DeltaTable::try_from_url_with_storage_options(url.clone(), lake.storage_options().clone())
        .await
        .map_err(|e| format!("open {url}: {e}"))?;
    let table = table.write(vec![probe_batch()]).await.map_err(|e| format!("write {url}: {e}"))?;
    let ctx = SessionContext::new();
    table.update_datafusion_session(&ctx.state()).map_err(|e| e.to_string())?;
    let provider = table.table_provider().await.map_err(|e| e.to_string())?;
    ctx.register_table("probe", provider).map_err(|e| e.to_string())?;
    let batches = ctx
        .sql("SELECT count(*) AS n, sum(id) AS s, count(name) AS names FROM probe")
        .await
        .map_err(|e| e.to_string())?
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let b = batches.first().ok_or("no result")?;
    let get = |i: usize| b.column(i).as_any().downcast_ref::<Int64Array>().map(|a| a.value(0));
    match (get(0), get(1), get(2)) {
        (Some(3), Some(6), Some(2)) => Ok(format!(
            "table version {}, 3 rows read back",
            table.version().map_or("?".to_string(), |v| v.to_string())
        )),
        other => Err(format!("read back (count, sum, non-null names) = {other:?}, expected (3, 6, 2)")),
    }
}

async fn lance_round_trip(lake: &Lake, base: &str) -> Result<String, String> {
    use lance::dataset::{Dataset, WriteParams, builder::DatasetBuilder};
    use lance::io::ObjectStoreParams;
    let uri = lake.table_url(&format!("{base}/probe.lance")).to_string();
    let uri = uri.trim_end_matches('/').to_string();
    let batch = probe_batch();
    let reader = RecordBatchIterator::new(vec![Ok(batch.clone())], batch.schema());
    let store_params = ObjectStoreParams {
        storage_options_accessor: (!lake.storage_options().is_empty())
            .then(|| Arc::new(lance::io::StorageOptionsAccessor::with_static_options(lake.storage_options().clone()))),
        ..Default::default()
    };
    let params = WriteParams { store_params: Some(store_params), ..Default::default() };
    Dataset::write(reader, uri.as_str(), Some(params)).await.map_err(|e| format!("write {uri}: {e}"))?;
    let ds = DatasetBuilder::from_uri(&uri)
        .with_storage_options(lake.storage_options().clone())
        .load()
        .await
        .map_err(|e| format!("open {uri}: {e}"))?;
    let n = ds.count_rows(None).await.map_err(|e| e.to_string())?;
    if n != 3 {
        return Err(format!("read back {n} rows, expected 3"));
    }
    Ok("3 rows read back".to_string())
}

async fn cleanup(lake: &Lake, base: &str) -> Result<(), String> {
    let store = lake.store();
    let prefix = lake.path(base);
    let paths: Vec<_> = store.list(Some(&prefix)).map(|m| m.map(|m| m.location)).collect::<Vec<_>>().await;
    for p in paths {
        let p = p.map_err(|e| e.to_string())?;
        store.delete(&p).await.map_err(|e| format!("delete {p}: {e}"))?;
    }
    Ok(())
}
