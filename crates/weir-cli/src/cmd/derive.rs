//! `weir derive`: the jobs of tables/jobs over the lake.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use weir_core::{Config, parse_timestamp};
use weir_derive::{DeriveOptions, JobOutcome, JobReport, Jobs, MakeSelection};
use weir_lake::Lake;

use super::{secs, thousands};
use crate::cli::DeriveArgs;

/// The repository's tables/jobs, built in for use outside a checkout.
const BUILTIN_JOBS: &[(&str, &str)] = &[
    ("built-in tables/jobs/model.sql", include_str!("../../../../tables/jobs/model.sql")),
    ("built-in tables/jobs/dealer.sql", include_str!("../../../../tables/jobs/dealer.sql")),
    ("built-in tables/jobs/listing.sql", include_str!("../../../../tables/jobs/listing.sql")),
    ("built-in tables/jobs/listing_price.sql", include_str!("../../../../tables/jobs/listing_price.sql")),
    ("built-in tables/jobs/ads_base.sql", include_str!("../../../../tables/jobs/ads_base.sql")),
    ("built-in tables/jobs/ads.sql", include_str!("../../../../tables/jobs/ads.sql")),
];

pub fn load_jobs(dir: Option<&Path>, bronze: &[String]) -> Result<Jobs> {
    let default = Path::new("tables/jobs");
    Ok(match dir {
        Some(d) => weir_derive::load_dir(d, bronze)?,
        None if default.is_dir() => weir_derive::load_dir(default, bronze)?,
        None => weir_derive::jobs::from_texts(BUILTIN_JOBS, bronze)?,
    })
}

/// The jobs of `dir` (see [`load_jobs`]) checked against the default sources.
pub fn load_jobs_with_default_sources(dir: Option<&Path>) -> Result<Jobs> {
    let sources = super::backfill::load_sources(None)?;
    let bronze = sources.names();
    load_jobs(dir, &bronze)
}

pub async fn run(a: DeriveArgs, cfg: &Config) -> Result<()> {
    let lake = crate::settings::open_lake(a.lake.as_deref(), cfg, a.allow_non_eu).await?;
    let sources = super::backfill::load_sources(a.sources.as_deref())?;
    let bronze = sources.names();
    let jobs = load_jobs(a.jobs_dir.as_deref(), &bronze)?;
    let makes = match a.make {
        Some(m) => MakeSelection::One(weir_core::validate_slug(&m)?.to_string()),
        None => MakeSelection::All,
    };
    let as_of_micros = as_of_or_default(a.as_of.as_deref(), &lake, &bronze).await?;
    let opts = DeriveOptions {
        job: a.job.clone(),
        makes,
        as_of_micros,
        full: a.full,
        target_file_bytes: a.target_file_mb << 20,
    };
    println!("derive {} as of {}", lake.url(), show_micros(as_of_micros));
    let inside = weir_ingest::cdc::tables_inside_a_transaction(&lake, &sources.tables).await?;
    if !inside.is_empty() {
        tracing::warn!(
            tables = inside.join(", "),
            "these tables hold part of a transaction `weir sync` has not finished (it was stopped or killed between two parts): the marts will show it half applied until a sync finishes it and derive runs again"
        );
    }
    let reports = run_derive(&lake, &jobs, &bronze, &opts).await?;
    print_reports(&reports);
    Ok(())
}

/// `--as-of`, or when the newest bronze table was committed (µs).
pub async fn as_of_or_default(as_of: Option<&str>, lake: &Lake, bronze: &[String]) -> Result<i64> {
    Ok(match as_of {
        Some(t) => parse_timestamp(t)?.timestamp_micros(),
        None => weir_derive::run::default_as_of(lake, bronze)
            .await?
            .context("the lake has no bronze tables yet: run `weir backfill` first")?,
    })
}

pub fn show_micros(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .unwrap_or_else(|| us.to_string())
}

pub async fn run_derive(lake: &Lake, jobs: &Jobs, bronze: &[String], opts: &DeriveOptions) -> Result<Vec<JobReport>> {
    let started = Instant::now();
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let reports =
        weir_derive::derive(lake, jobs, bronze, opts, |out| spinner.set_message(format!("building {out}"))).await;
    spinner.finish_and_clear();
    let reports = reports?;
    tracing::info!(elapsed = ?started.elapsed(), "derive done");
    Ok(reports)
}

pub fn print_reports(reports: &[JobReport]) {
    let width = reports.iter().map(|r| r.output.len()).max().unwrap_or(10);
    let mut built = 0;
    for r in reports {
        match &r.outcome {
            JobOutcome::Built { version, rows, files, bytes, elapsed } => {
                built += 1;
                println!(
                    "  {:width$}  built v{version}: {} rows, {} files, {:.1} MB in {} — {}",
                    r.output,
                    thousands(*rows),
                    files,
                    *bytes as f64 / 1e6,
                    secs(*elapsed),
                    r.reason
                );
            }
            JobOutcome::Incremental { version, new_rows, merged, recomputed, deleted, elapsed } => {
                built += 1;
                if *new_rows == 0 && *merged == 0 {
                    println!(
                        "  {:width$}  incremental v{version}: {} keys recomputed, {} removed in {} — {}",
                        r.output,
                        thousands(*recomputed),
                        thousands(*deleted),
                        secs(*elapsed),
                        r.reason
                    );
                    continue;
                }
                println!(
                    "  {:width$}  incremental v{version}: {} new source rows folded into {} keys, {} keys recomputed, {} removed in {} — {}",
                    r.output,
                    thousands(*new_rows),
                    thousands(*merged),
                    thousands(*recomputed),
                    thousands(*deleted),
                    secs(*elapsed),
                    r.reason
                );
            }
            JobOutcome::Versioned { version, opened, closed, elapsed } => {
                built += 1;
                println!(
                    "  {:width$}  versioned v{version}: {} versions opened, {} closed in {} — {}",
                    r.output,
                    thousands(*opened),
                    thousands(*closed),
                    secs(*elapsed),
                    r.reason
                );
            }
            JobOutcome::UpToDate { version } => println!("  {:width$}  up to date (v{version})", r.output),
            JobOutcome::View => println!("  {:width$}  view ({})", r.output, r.reason),
        }
    }
    if built == 0 {
        println!("nothing changed: every table is up to date");
    }
}
