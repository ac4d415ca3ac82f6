//! `weir generate`: create and fill the source marketplace, deterministically, with COPY BINARY.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::Client;
use weir_postgres::{CopyBinaryWriter, PgError, connect, copy};

use crate::hard::{HARD_CASES, hard_cases};
use crate::model::{self, HISTORY_END, HISTORY_START, Taxonomy, Window, unix_day};
use crate::schema::{self, SOURCE_TABLES};
use crate::{Progress, SynthError};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// 1.0 ≈ 100k listings and ~1M price_log rows.
    pub scale: f64,
    pub seed: u64,
    /// Drop an existing marketplace first.
    pub replace: bool,
}

#[derive(Debug, Clone, Default)]
pub struct GenerateReport {
    /// (table, rows) in load order.
    pub tables: Vec<(String, u64)>,
}

impl GenerateReport {
    pub fn rows(&self, table: &str) -> u64 {
        self.tables.iter().find(|(t, _)| t == table).map_or(0, |(_, n)| *n)
    }
}

/// Listings at a scale: SF 1 = 100,000, never fewer than the hard cases plus 30.
pub fn listing_count(scale: f64) -> Result<u64, SynthError> {
    if !scale.is_finite() || scale <= 0.0 || scale > 1000.0 {
        return Err(SynthError::Scale(scale));
    }
    Ok(((scale * 100_000.0).round() as u64).max(HARD_CASES as u64 + 30))
}

const CHUNK_LISTINGS: i64 = 4096;

pub async fn generate(
    url: &str,
    opts: &GenerateOptions,
    progress: Arc<dyn Progress>,
) -> Result<GenerateReport, SynthError> {
    let n_listings = listing_count(opts.scale)?;
    let seed = opts.seed;
    let client = connect(url).await?;
    prepare_schema(&client, opts.replace).await?;
    let mut report = GenerateReport::default();

    // Small tables first: the taxonomy and the dealers.
    let makes = model::gen_makes();
    let models = model::gen_models(seed, &makes);
    let dealers: Vec<_> = (1..=model::dealer_count(n_listings) as i64).map(|id| model::gen_dealer(seed, id)).collect();
    let fx = model::gen_fx(seed, unix_day(HISTORY_START), unix_day(HISTORY_END) - 1);
    let mut load_small =
        async |table: &str, n: usize, encode: &dyn Fn(&mut CopyBinaryWriter)| -> Result<(), SynthError> {
            progress.start(table, n as u64);
            let mut w = CopyBinaryWriter::with_capacity(n * 64);
            encode(&mut w);
            let rows = copy::copy_in(&client, &format!("COPY {table} FROM STDIN (FORMAT binary)"), [w.take()]).await?;
            progress.finish(table, rows);
            report.tables.push((table.to_string(), rows));
            Ok(())
        };
    load_small("makes", makes.len(), &|w| makes.iter().for_each(|m| schema::encode_make(w, m))).await?;
    load_small("models", models.len(), &|w| models.iter().for_each(|m| schema::encode_model(w, m))).await?;
    load_small("dealers", dealers.len(), &|w| dealers.iter().for_each(|d| schema::encode_dealer(w, d))).await?;
    load_small("fx_rates", fx.len(), &|w| fx.iter().for_each(|f| schema::encode_fx(w, f))).await?;

    let dealer_refs: Vec<(i64, &'static str)> = dealers.iter().map(|d| (d.dealer_id, d.country)).collect();
    let tax = Arc::new(Taxonomy::new(makes, models, &dealer_refs));
    let (listings, prices) = load_listings(url, seed, n_listings, tax, progress.as_ref()).await?;
    report.tables.push(("listings".to_string(), listings));
    report.tables.push(("price_log".to_string(), prices));

    // Keys after the load: much faster than maintaining them row by row.
    let mut keyed = Vec::new();
    for stmt in schema::ADD_KEYS {
        let url = url.to_string();
        keyed.push(tokio::spawn(async move {
            let c = connect(&url).await?;
            c.batch_execute(&format!("SET maintenance_work_mem = '256MB'; {stmt}")).await.map_err(PgError::query(*stmt))
        }));
    }
    for k in keyed {
        k.await.map_err(|e| SynthError::Task(e.to_string()))??;
    }
    client.batch_execute("ANALYZE").await.map_err(PgError::query("ANALYZE"))?;
    // Keep the load order of SOURCE_TABLES in the report.
    report.tables.sort_by_key(|(t, _)| SOURCE_TABLES.iter().position(|s| s == t));
    Ok(report)
}

async fn prepare_schema(client: &Client, replace: bool) -> Result<(), SynthError> {
    let names: Vec<String> = SOURCE_TABLES.iter().map(|s| s.to_string()).collect();
    let existing: Vec<String> = client
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' AND table_name = ANY($1) ORDER BY 1",
            &[&names],
        )
        .await
        .map_err(PgError::query("checking for existing tables"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !existing.is_empty() {
        if !replace {
            return Err(SynthError::AlreadyExists(format!("tables {}", existing.join(", "))));
        }
        let drop = format!("DROP TABLE IF EXISTS {} CASCADE", SOURCE_TABLES.join(", "));
        client.batch_execute(&drop).await.map_err(PgError::query("dropping the old marketplace"))?;
    }
    client.batch_execute(schema::CREATE_TABLES).await.map_err(PgError::query("creating the source tables"))?;
    Ok(())
}

/// Listings and price rows: encoded in parallel blocking tasks (in order, so the bytes are
/// the same for the same seed), streamed to two COPYs on two connections.
async fn load_listings(
    url: &str,
    seed: u64,
    n: u64,
    tax: Arc<Taxonomy>,
    progress: &dyn Progress,
) -> Result<(u64, u64), SynthError> {
    progress.start("listings", n);
    progress.start("price_log", n * 10);
    let (ltx, lrx) = mpsc::channel::<Bytes>(4);
    let (ptx, prx) = mpsc::channel::<Bytes>(4);
    let lurl = url.to_string();
    let purl = url.to_string();
    let lcopy =
        tokio::spawn(async move { copy_from_channel(&lurl, "COPY listings FROM STDIN (FORMAT binary)", lrx).await });
    let pcopy =
        tokio::spawn(async move { copy_from_channel(&purl, "COPY price_log FROM STDIN (FORMAT binary)", prx).await });

    let chunk_count = (n as i64 + CHUNK_LISTINGS - 1) / CHUNK_LISTINGS;
    let mut encoded = futures::stream::iter(0..chunk_count)
        .map(|c| {
            let tax = tax.clone();
            tokio::task::spawn_blocking(move || {
                encode_chunk(seed, &tax, c * CHUNK_LISTINGS + 1, ((c + 1) * CHUNK_LISTINGS).min(n as i64))
            })
        })
        .buffered(2);
    let mut sent_err = None;
    while let Some(chunk) = encoded.next().await {
        let (lbytes, lrows, pbytes, prows) = chunk.map_err(|e| SynthError::Task(e.to_string()))?;
        if ltx.send(lbytes).await.is_err() || ptx.send(pbytes).await.is_err() {
            sent_err = Some(());
            break;
        }
        progress.advance("listings", lrows);
        progress.advance("price_log", prows);
    }
    drop(ltx);
    drop(ptx);
    let listings = lcopy.await.map_err(|e| SynthError::Task(e.to_string()))??;
    let prices = pcopy.await.map_err(|e| SynthError::Task(e.to_string()))??;
    if sent_err.is_some() {
        return Err(SynthError::Task("a COPY stream closed early".to_string()));
    }
    progress.finish("listings", listings);
    progress.finish("price_log", prices);
    Ok((listings, prices))
}

async fn copy_from_channel(url: &str, statement: &str, rx: mpsc::Receiver<Bytes>) -> Result<u64, SynthError> {
    let client = connect(url).await?;
    client.batch_execute("SET synchronous_commit = off").await.map_err(PgError::query("SET synchronous_commit"))?;
    let chunks = tokio_stream_from(rx);
    Ok(copy::copy_in_stream(&client, statement, chunks).await?)
}

fn tokio_stream_from(mut rx: mpsc::Receiver<Bytes>) -> impl futures::Stream<Item = Bytes> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Listing ids `first..=last` (the first chunk carries the hard cases).
fn encode_chunk(seed: u64, tax: &Taxonomy, first: i64, last: i64) -> (Bytes, u64, Bytes, u64) {
    let mut lw = CopyBinaryWriter::with_capacity((last - first + 1) as usize * 200);
    let mut pw = CopyBinaryWriter::with_capacity((last - first + 1) as usize * 10 * 50);
    let (mut lrows, mut prows) = (0u64, 0u64);
    let mut emit = |l: &model::Listing, ps: &[model::Price]| {
        schema::encode_listing(&mut lw, l);
        lrows += 1;
        for p in ps {
            schema::encode_price(&mut pw, p);
        }
        prows += ps.len() as u64;
    };
    let window = Window::history();
    if first == 1 {
        for (l, ps) in hard_cases(tax) {
            emit(&l, &ps);
        }
    }
    for id in first.max(HARD_CASES + 1)..=last {
        let (l, ps) = model::gen_listing(seed, id, tax, &window);
        emit(&l, &ps);
    }
    (lw.take(), lrows, pw.take(), prows)
}
