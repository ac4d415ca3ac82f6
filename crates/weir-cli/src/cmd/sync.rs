//! `weir sync`: the changes PostgreSQL recorded since the backfill → the bronze Delta tables.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use weir_core::Config;
use weir_ingest::{BatchReport, SyncOptions, SyncReport, TableChanges};

use super::{backfill::load_sources, thousands};
use crate::cli::SyncArgs;
use crate::settings;

pub async fn run(a: SyncArgs, cfg: &Config) -> Result<()> {
    let url = settings::pg_url(a.pg.pg.as_deref(), cfg)?;
    let lake = settings::open_lake(a.lake.as_deref(), cfg, a.allow_non_eu).await?;
    let sources = load_sources(a.sources.as_deref())?;
    let tables = sources.select(a.tables.as_deref())?;
    if a.batch_changes == 0 {
        bail!("--batch-changes must be at least 1");
    }
    let opts = SyncOptions {
        slot: a.slot.unwrap_or_else(|| weir_ingest::default_slot_name(lake.url().as_str())),
        follow: a.follow,
        batch_changes: i32::try_from(a.batch_changes).unwrap_or(i32::MAX),
        poll: Duration::from_millis(a.poll_ms.max(1)),
        decoding_work_mem: decoding_work_mem(&a.decoding_work_mem),
    };
    println!("sync {} (slot {}) → {}", weir_postgres::describe_url(&url), opts.slot, lake.url());
    let stop = Arc::new(AtomicBool::new(false));
    let _signals = stop_on_signals(stop.clone());
    let report = weir_ingest::sync(&url, &lake, &tables, &opts, &stop, print_batch).await?;
    print_report(&report);
    Ok(())
}

/// `--decoding-work-mem`: a size for the sync's session, or "server" for the server's own.
pub fn decoding_work_mem(arg: &str) -> Option<String> {
    (!arg.eq_ignore_ascii_case("server")).then(|| arg.to_string())
}

/// Sets `stop` on Ctrl-C or SIGTERM: the batch in hand is finished, then the command returns.
pub fn stop_on_signals(stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut term) = signal(SignalKind::terminate()) else { return };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("stopping after the batch in hand…");
        stop.store(true, Ordering::Relaxed);
    })
}

fn changes(t: &TableChanges) -> String {
    let mut parts = vec![format!("+{} ~{} -{}", thousands(t.inserts), thousands(t.updates), thousands(t.deletes))];
    if t.truncates > 0 {
        parts.push(format!("{} truncate(s)", t.truncates));
    }
    if t.skipped > 0 {
        parts.push(format!("{} already applied", thousands(t.skipped)));
    }
    if let Some(v) = t.version {
        parts.push(format!("v{v}"));
    }
    format!("{} {}", t.table, parts.join(" "))
}

pub fn print_batch(b: &BatchReport) {
    let tables: Vec<String> = b.tables.iter().map(changes).collect();
    let inside = if b.inside { " (inside the transaction committing there: its first changes)" } else { "" };
    println!(
        "  {} → {}{inside}: {} transactions, {} changes in {:.2} s  [{}]",
        b.from_lsn,
        b.to_lsn,
        thousands(b.transactions),
        thousands(b.changes),
        b.seconds,
        tables.join("; ")
    );
}

fn print_report(r: &SyncReport) {
    if r.batches == 0 {
        println!("nothing new: the lake holds every change up to {}", r.lsn);
        return;
    }
    println!(
        "applied {} transactions ({} changes) in {} batch(es); slot confirmed at {}",
        thousands(r.transactions),
        thousands(r.changes),
        r.batches,
        r.lsn
    );
    if r.inside {
        println!(
            "stopped inside a transaction larger than a batch: its first changes are applied, the next sync applies the rest"
        );
    }
    println!("  {:<10} {:>10} {:>10} {:>10} {:>12}", "table", "inserts", "updates", "deletes", "lake rows ±");
    for t in r.tables.iter().filter(|t| t.inserts + t.updates + t.deletes + t.truncates + t.skipped > 0) {
        println!(
            "  {:<10} {:>10} {:>10} {:>10} {:>12}",
            t.table,
            thousands(t.inserts),
            thousands(t.updates),
            thousands(t.deletes),
            format!("+{} -{}", thousands(t.rows_inserted), thousands(t.rows_deleted))
        );
    }
}
