//! `weir backfill`: PostgreSQL tables → Delta tables under <lake>/bronze.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use weir_core::Config;
use weir_ingest::{BackfillOptions, Metrics, Outcome, SlotMode, Sources, TableReport};
use weir_lake::Lake;

use super::{secs, thousands};
use crate::cli::BackfillArgs;
use crate::settings;

pub async fn run(a: BackfillArgs, cfg: &Config) -> Result<()> {
    let url = settings::pg_url(a.pg.pg.as_deref(), cfg)?;
    let lake = settings::open_lake(a.lake.as_deref(), cfg, a.allow_non_eu).await?;
    let sources = load_sources(a.sources.as_deref())?;
    let tables = sources.select(a.tables.as_deref())?;
    let slot = match (a.no_slot, a.slot) {
        (true, _) => SlotMode::NoSlot,
        (false, Some(name)) => SlotMode::Slot(name),
        (false, None) => SlotMode::Slot(weir_ingest::default_slot_name(lake.url().as_str())),
    };
    let opts = BackfillOptions {
        jobs: a.jobs,
        chunk_rows: a.chunk_rows,
        force: a.force,
        target_file_bytes: a.target_file_mb << 20,
        slot: slot.clone(),
        ..BackfillOptions::default()
    };
    println!("backfill {} → {}", weir_postgres::describe_url(&url), lake.url());
    let reports = run_backfill(&url, &lake, &tables, &opts, a.metrics_addr.as_deref()).await?;
    print_reports(&reports);
    if let SlotMode::Slot(name) = &slot
        && reports.iter().any(|r| matches!(r.outcome, Outcome::Committed { .. }))
    {
        println!("logical replication slot {name} holds WAL from the snapshot on, for `weir sync`");
    }
    Ok(())
}

/// The repository's tables/sources.toml, built in for use outside a checkout.
const BUILTIN_SOURCES: &str = include_str!("../../../../tables/sources.toml");

pub fn load_sources(path: Option<&std::path::Path>) -> Result<Sources> {
    let default = std::path::Path::new("tables/sources.toml");
    match path {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("cannot read sources file {}", p.display()))?;
            Ok(Sources::parse(&text, &p.display().to_string())?)
        }
        None if default.is_file() => load_sources(Some(default)),
        None => Ok(Sources::parse(BUILTIN_SOURCES, "built-in tables/sources.toml")?),
    }
}

/// Runs the backfill with progress bars (and the metrics endpoint when asked).
pub async fn run_backfill(
    url: &str,
    lake: &Lake,
    tables: &[weir_ingest::SourceTable],
    opts: &BackfillOptions,
    metrics_addr: Option<&str>,
) -> Result<Vec<TableReport>> {
    let metrics = Arc::new(Metrics::default());
    let _server = match metrics_addr {
        Some(addr) => {
            let (bound, task) = weir_ingest::metrics::serve(addr, metrics.clone())
                .await
                .with_context(|| format!("cannot serve metrics on {addr}"))?;
            println!("metrics on http://{bound}/metrics");
            Some(AbortOnDrop(task))
        }
        None => None,
    };
    let bars = MultiProgress::new();
    let mut table_bars = Vec::new();
    for t in tables {
        let bar = bars.add(ProgressBar::new(0));
        bar.set_style(
            ProgressStyle::with_template(
                "  {prefix:<10} {bar:30} {human_pos:>11}/{human_len:<11} rows  {msg}  eta {eta}",
            )
            .expect("valid template"),
        );
        bar.set_prefix(t.name.clone());
        table_bars.push((metrics.table(&t.name), bar));
    }
    let started = Instant::now();
    let ticker = {
        let table_bars = table_bars.clone();
        tokio::spawn(async move {
            loop {
                for (c, bar) in &table_bars {
                    bar.set_length(c.expected_rows.load(Ordering::Relaxed).max(c.rows.load(Ordering::Relaxed)));
                    bar.set_position(c.rows.load(Ordering::Relaxed));
                    let mb = c.source_bytes.load(Ordering::Relaxed) as f64 / 1e6;
                    bar.set_message(format!(
                        "{:.1} MB/s  chunks {}/{}",
                        mb / started.elapsed().as_secs_f64().max(0.001),
                        c.chunks_done.load(Ordering::Relaxed),
                        c.chunks_total.load(Ordering::Relaxed)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let result = weir_ingest::backfill(url, lake, tables, opts, metrics).await;
    ticker.abort();
    for (_, bar) in table_bars {
        bar.finish_and_clear();
    }
    Ok(result?)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub fn print_reports(reports: &[TableReport]) {
    println!("  {:<10} {:>12} {:>10} {:>6} {:>9} {:>12}  result", "table", "rows", "MB", "files", "seconds", "rows/s");
    for r in reports {
        let rate = if r.seconds > 0.0 { thousands((r.rows as f64 / r.seconds) as u64) } else { "-".into() };
        let outcome = match r.outcome {
            Outcome::Committed { version } if r.resumed_chunks > 0 => {
                format!(
                    "committed version {version} (resumed: {} of {} chunks from the interrupted run)",
                    r.resumed_chunks, r.chunks
                )
            }
            Outcome::Committed { version } => format!("committed version {version}, snapshot LSN {}", r.snapshot_lsn),
            Outcome::UpToDate { version } => {
                format!("already landed, now at version {version}; nothing to do (--force rebuilds)")
            }
        };
        // A table CDC has committed to since its backfill: the landed size is not at hand.
        let known = !matches!(r.outcome, Outcome::UpToDate { .. }) || !r.snapshot_lsn.is_empty();
        let or_dash = |v: String| if known { v } else { "-".into() };
        println!(
            "  {:<10} {:>12} {:>10} {:>6} {:>9} {:>12}  {outcome}",
            r.table,
            or_dash(thousands(r.rows)),
            or_dash(format!("{:.1}", r.bytes as f64 / 1e6)),
            or_dash(r.files.to_string()),
            if r.seconds > 0.0 { secs(Duration::from_secs_f64(r.seconds)) } else { "-".into() },
            rate
        );
    }
}
