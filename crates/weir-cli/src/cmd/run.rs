//! `weir run`: the continuous loop. CDC into bronze, then the jobs whose inputs changed
//! (incremental where declared), while Flight SQL serves the lake; `/health` and `/metrics`
//! report progress and the freshness lag (source commit → mart committed). Errors (a
//! PostgreSQL or S3 restart) are retried with back-off; SIGTERM finishes the batch in hand.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use weir_core::Config;
use weir_ingest::SyncOptions;

use super::serve::flight_options;
use crate::cli::RunArgs;
use crate::settings;

#[derive(Default)]
struct Status {
    cycles: AtomicU64,
    transactions: AtomicU64,
    changes: AtomicU64,
    derives: AtomicU64,
    feature_runs: AtomicU64,
    errors: AtomicU64,
    vacuums: AtomicU64,
    vacuumed_files: AtomicU64,
    vacuumed_bytes: AtomicU64,
    /// Milliseconds; -1 before the first measurement.
    last_lag_ms: AtomicI64,
    lags_ms: Mutex<VecDeque<f64>>,
    lsn: Mutex<String>,
    last_error: Mutex<String>,
    /// Changes synced but not yet derived (a derive that failed is retried by the next
    /// cycle even when it syncs nothing): the oldest source commit among them (µs).
    pending: Mutex<Option<i64>>,
    /// Whether anything is pending at all (a change without a commit time counts).
    pending_any: AtomicBool,
}

impl Status {
    fn quantile(&self, q: f64) -> Option<f64> {
        let lags = self.lags_ms.lock().unwrap_or_else(|p| p.into_inner());
        if lags.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = lags.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        Some(v[((v.len() - 1) as f64 * q).round() as usize])
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        let mut put = |name: &str, kind: &str, help: &str, v: String| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
        };
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        put("weir_run_cycles_total", "counter", "Loop iterations", n(&self.cycles));
        put("weir_cdc_transactions_total", "counter", "Source transactions applied", n(&self.transactions));
        put("weir_cdc_changes_total", "counter", "Row changes applied", n(&self.changes));
        put("weir_derive_runs_total", "counter", "Derive runs after changes", n(&self.derives));
        put(
            "weir_derive_pending",
            "gauge",
            "1 while synced changes wait for their derive (at start: until the first cycle has derived)",
            u8::from(self.pending_any.load(Ordering::Relaxed)).to_string(),
        );
        put("weir_features_runs_total", "counter", "Feature and vector refreshes after changes", n(&self.feature_runs));
        put("weir_run_errors_total", "counter", "Failed iterations (retried)", n(&self.errors));
        put("weir_vacuum_runs_total", "counter", "Background vacuums of every table", n(&self.vacuums));
        put("weir_vacuum_files_deleted_total", "counter", "Files deleted by vacuums", n(&self.vacuumed_files));
        put("weir_vacuum_bytes_deleted_total", "counter", "Bytes deleted by vacuums", n(&self.vacuumed_bytes));
        let lag = self.last_lag_ms.load(Ordering::Relaxed);
        if lag >= 0 {
            put(
                "weir_freshness_lag_seconds",
                "gauge",
                "Source commit to mart committed, last cycle",
                format!("{}", lag as f64 / 1e3),
            );
        }
        for (q, label) in [(0.5, "p50"), (0.95, "p95")] {
            if let Some(v) = self.quantile(q) {
                put(
                    &format!("weir_freshness_lag_{label}_seconds"),
                    "gauge",
                    "Freshness lag over the last 1000 cycles with changes",
                    format!("{}", v / 1e3),
                );
            }
        }
        out
    }

    fn health(&self) -> String {
        let lag = self.last_lag_ms.load(Ordering::Relaxed);
        format!(
            "{{\"status\":\"{}\",\"lsn\":\"{}\",\"transactions\":{},\"changes\":{},\"derives\":{},\"pending\":{},\"feature_runs\":{},\"errors\":{},\"vacuumed_files\":{},\"freshness_lag_ms\":{},\"lag_p50_ms\":{},\"lag_p95_ms\":{},\"last_error\":{:?}}}\n",
            if self.last_error.lock().unwrap_or_else(|p| p.into_inner()).is_empty() { "ok" } else { "retrying" },
            self.lsn.lock().unwrap_or_else(|p| p.into_inner()),
            self.transactions.load(Ordering::Relaxed),
            self.changes.load(Ordering::Relaxed),
            self.derives.load(Ordering::Relaxed),
            self.pending_any.load(Ordering::Relaxed),
            self.feature_runs.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            self.vacuumed_files.load(Ordering::Relaxed),
            if lag >= 0 { lag.to_string() } else { "null".into() },
            self.quantile(0.5).map_or("null".into(), |v| format!("{v:.0}")),
            self.quantile(0.95).map_or("null".into(), |v| format!("{v:.0}")),
            self.last_error.lock().unwrap_or_else(|p| p.into_inner()).as_str(),
        )
    }
}

pub async fn run(a: RunArgs, cfg: &Config) -> Result<()> {
    let url = settings::pg_url(a.pg.pg.as_deref(), cfg)?;
    let lake = settings::open_lake(a.lake.as_deref(), cfg, a.allow_non_eu).await?;
    let sources = super::backfill::load_sources(None)?;
    let bronze = sources.names();
    let jobs = super::derive::load_jobs(None, &bronze)?;
    let features = if a.features { Some(super::features::load_feature_jobs(None, None, &bronze)?) } else { None };
    let sync_opts = SyncOptions {
        slot: a.slot.clone().unwrap_or_else(|| weir_ingest::default_slot_name(lake.url().as_str())),
        follow: false,
        batch_changes: i32::try_from(a.batch_changes.max(1)).unwrap_or(i32::MAX),
        poll: Duration::from_millis(a.poll_ms.max(1)),
        decoding_work_mem: super::sync::decoding_work_mem(&a.decoding_work_mem),
    };

    // The first cycle derives whatever an earlier run synced but did not derive (a kill
    // between the two), then only after changes.
    let status =
        Arc::new(Status { last_lag_ms: AtomicI64::new(-1), pending_any: AtomicBool::new(true), ..Default::default() });
    let handler: weir_ingest::metrics::Handler = {
        let status = status.clone();
        Arc::new(move |path: &str| match path {
            "/health" => Some(status.health()),
            "/metrics" => Some(status.metrics()),
            _ => None,
        })
    };
    let (status_addr, status_task) = weir_ingest::metrics::serve_http(&a.status_addr, handler)
        .await
        .with_context(|| format!("cannot serve status on {}", a.status_addr))?;

    let stop = Arc::new(AtomicBool::new(false));
    let _signals = super::sync::stop_on_signals(stop.clone());
    let (flight_opts, auth, scheme, _) = flight_options(&a.addr, a.memory_limit_mb, 1000, cfg)?;
    let catalog =
        weir_flight::Catalog::new(lake.clone(), jobs.clone(), flight_opts.refresh, flight_opts.memory_limit_bytes);
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let server = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut bound_tx = Some(bound_tx);
            weir_flight::serve(
                catalog,
                auth,
                &flight_opts,
                |b| {
                    if let Some(tx) = bound_tx.take() {
                        let _ = tx.send(b);
                    }
                },
                async move {
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            )
            .await
        })
    };
    let flight_addr = bound_rx.await.context("the Flight SQL server did not start")?;
    println!(
        "weir run: slot {} → {}; Flight SQL on {scheme}://{flight_addr}; status on http://{status_addr}/health and /metrics",
        sync_opts.slot,
        lake.url()
    );
    let _ = std::io::stdout().flush();

    let vacuum = (!a.vacuum_every.is_zero())
        .then(|| tokio::spawn(vacuum_loop(lake.clone(), a.vacuum_every, a.retain, stop.clone(), status.clone())));

    let mut backoff = Duration::from_millis(500);
    while !stop.load(Ordering::Relaxed) {
        status.cycles.fetch_add(1, Ordering::Relaxed);
        let run = Cycle { jobs: &jobs, features: features.as_ref(), bronze: &bronze, make: a.make.as_deref() };
        match cycle(&url, &lake, &sources.tables, &run, &sync_opts, &stop, &status).await {
            Ok(()) => {
                backoff = Duration::from_millis(500);
                status.last_error.lock().unwrap_or_else(|p| p.into_inner()).clear();
                sleep_unless(&stop, sync_opts.poll).await;
            }
            Err(e) => {
                status.errors.fetch_add(1, Ordering::Relaxed);
                let text = format!("{e:#}");
                eprintln!("weir run: {text}; retrying in {:.1} s", backoff.as_secs_f64());
                *status.last_error.lock().unwrap_or_else(|p| p.into_inner()) = text;
                sleep_unless(&stop, backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    if let Some(v) = vacuum {
        v.await.context("the vacuum task")?;
    }
    eprintln!("weir run: stopped");
    server.await.context("the Flight SQL server task")??;
    status_task.abort();
    Ok(())
}

async fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d && !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Every `every`, vacuums every table of the lake with `retain`, beside the loop: it only
/// deletes what was removed (or written as change data) more than `retain` ago, which the
/// loop, always on the latest versions, no longer reads.
async fn vacuum_loop(
    lake: weir_lake::Lake,
    every: Duration,
    retain: Duration,
    stop: Arc<AtomicBool>,
    status: Arc<Status>,
) {
    loop {
        sleep_unless(&stop, every).await;
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match super::vacuum::vacuum_lake(&lake, &[], retain, false).await {
            Ok(done) => {
                let (files, bytes) = (done.files(), done.bytes());
                status.vacuums.fetch_add(1, Ordering::Relaxed);
                status.vacuumed_files.fetch_add(files, Ordering::Relaxed);
                status.vacuumed_bytes.fetch_add(bytes, Ordering::Relaxed);
                if files > 0 {
                    println!("  vacuum: deleted {files} file(s), {:.1} MB", bytes as f64 / 1e6);
                }
            }
            // The next round tries again; the loop's own work does not depend on it.
            Err(e) => eprintln!("weir run: vacuum: {e:#}"),
        }
    }
}

/// What a cycle derives.
struct Cycle<'a> {
    jobs: &'a weir_derive::Jobs,
    /// The entity and feature jobs, when the ML layer is kept fresh too.
    features: Option<&'a weir_derive::Jobs>,
    bronze: &'a [String],
    make: Option<&'a str>,
}

/// One iteration: apply what PostgreSQL committed, then derive what changed.
async fn cycle(
    url: &str,
    lake: &weir_lake::Lake,
    tables: &[weir_ingest::SourceTable],
    run: &Cycle<'_>,
    opts: &SyncOptions,
    stop: &AtomicBool,
    status: &Status,
) -> Result<()> {
    let Cycle { jobs, bronze, make, .. } = *run;
    let mut oldest_commit: Option<i64> = None;
    let report = weir_ingest::sync(url, lake, tables, opts, stop, |b| {
        super::sync::print_batch(b);
        if let Some(t) = b.last_commit_micros {
            oldest_commit = Some(oldest_commit.map_or(t, |o: i64| o.min(t)));
        }
    })
    .await?;
    *status.lsn.lock().unwrap_or_else(|p| p.into_inner()) = report.lsn.clone();
    status.transactions.fetch_add(report.transactions, Ordering::Relaxed);
    status.changes.fetch_add(report.changes, Ordering::Relaxed);
    if report.inside {
        // Stopped inside a transaction applied in parts: no derive sees it half applied.
        return Ok(());
    }
    if report.changes > 0 {
        status.pending_any.store(true, Ordering::Relaxed);
        let mut pending = status.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = oldest_commit {
            *pending = Some(pending.map_or(t, |o| o.min(t)));
        }
    }
    if !status.pending_any.load(Ordering::Relaxed) {
        return Ok(());
    }
    let oldest_commit = *status.pending.lock().unwrap_or_else(|p| p.into_inner());
    let as_of =
        weir_derive::run::default_as_of(lake, bronze).await?.unwrap_or_else(|| chrono::Utc::now().timestamp_micros());
    let opts = weir_derive::DeriveOptions {
        job: None,
        makes: make.map_or(weir_derive::MakeSelection::All, |m| weir_derive::MakeSelection::One(m.to_string())),
        as_of_micros: as_of,
        full: false,
        target_file_bytes: 128 << 20,
    };
    let t = Instant::now();
    let reports = weir_derive::derive(lake, jobs, bronze, &opts, |_| {}).await?;
    if oldest_commit.is_some() || report.changes > 0 {
        status.derives.fetch_add(1, Ordering::Relaxed);
    }
    for r in &reports {
        if let weir_derive::JobOutcome::Incremental { elapsed, .. } | weir_derive::JobOutcome::Built { elapsed, .. } =
            &r.outcome
        {
            tracing::debug!("{} in {:.3} s: {}", r.output, elapsed.as_secs_f64(), r.reason);
        }
    }
    let built = reports
        .iter()
        .filter(|r| !matches!(r.outcome, weir_derive::JobOutcome::UpToDate { .. } | weir_derive::JobOutcome::View))
        .count();
    if let Some(committed) = oldest_commit {
        let lag_ms = (chrono::Utc::now().timestamp_micros() - committed) as f64 / 1e3;
        status.last_lag_ms.store(lag_ms as i64, Ordering::Relaxed);
        let mut lags = status.lags_ms.lock().unwrap_or_else(|p| p.into_inner());
        lags.push_back(lag_ms);
        if lags.len() > 1000 {
            lags.pop_front();
        }
        println!(
            "  derived {built} table(s) in {:.2} s; freshness lag {:.2} s (oldest source commit of the cycle → marts committed)",
            t.elapsed().as_secs_f64(),
            lag_ms / 1e3
        );
    }
    if let Some(feature_jobs) = run.features {
        let t = Instant::now();
        let fopts = weir_derive::DeriveOptions { makes: weir_derive::MakeSelection::All, ..opts };
        weir_ml::build_features(lake, feature_jobs, bronze, &fopts, |_| {}).await?;
        let v = weir_ml::vectors::refresh(lake, &Default::default()).await?;
        status.feature_runs.fetch_add(1, Ordering::Relaxed);
        println!("  features and vectors in {:.2} s: {}", t.elapsed().as_secs_f64(), v.mode);
    }
    *status.pending.lock().unwrap_or_else(|p| p.into_inner()) = None;
    status.pending_any.store(false, Ordering::Relaxed);
    Ok(())
}
