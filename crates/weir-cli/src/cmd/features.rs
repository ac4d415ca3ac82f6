//! `weir features` (feature jobs, vector table, price rating) and `weir similar`.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use arrow::array::{Array, AsArray};
use weir_core::Config;
use weir_derive::{DeriveOptions, Jobs, MakeSelection};
use weir_lake::Lake;
use weir_ml::vectors::{RefreshOptions, RefreshReport};

use super::derive::{load_jobs, print_reports, show_micros};
use super::secs;
use crate::cli::{FeaturesArgs, SimilarArgs};

/// The repository's tables/features, built in for use outside a checkout.
const BUILTIN_FEATURES: &[(&str, &str)] = &[
    ("built-in tables/features/listing_features.sql", include_str!("../../../../tables/features/listing_features.sql")),
    ("built-in tables/features/segment_price.sql", include_str!("../../../../tables/features/segment_price.sql")),
];

/// The entity jobs and the feature jobs, as one DAG.
pub fn load_feature_jobs(jobs_dir: Option<&Path>, features_dir: Option<&Path>, bronze: &[String]) -> Result<Jobs> {
    let entities = load_jobs(jobs_dir, bronze)?;
    let default = Path::new("tables/features");
    let features = match features_dir {
        Some(d) => weir_derive::jobs::parse_dir(d)?,
        None if default.is_dir() => weir_derive::jobs::parse_dir(default)?,
        None => BUILTIN_FEATURES
            .iter()
            .map(|(f, t)| weir_derive::jobs::parse_job(Path::new(f), t))
            .collect::<Result<_, _>>()?,
    };
    let all = entities.ordered.into_iter().chain(features).collect();
    Ok(weir_derive::jobs::order(all, bronze)?)
}

pub struct FeaturesRun {
    pub reports: Vec<weir_derive::JobReport>,
    pub vectors: RefreshReport,
}

/// Feature jobs, then the vector table.
pub async fn build(
    lake: &Lake,
    jobs: &Jobs,
    bronze: &[String],
    opts: &DeriveOptions,
    refresh: &RefreshOptions,
) -> Result<FeaturesRun> {
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let reports =
        weir_ml::build_features(lake, jobs, bronze, opts, |out| spinner.set_message(format!("building {out}"))).await;
    spinner.set_message(format!("refreshing {}", weir_ml::vectors::DATASET));
    let reports = reports?;
    let vectors = weir_ml::vectors::refresh(lake, refresh).await;
    spinner.finish_and_clear();
    Ok(FeaturesRun { reports, vectors: vectors? })
}

pub fn print_vectors(r: &RefreshReport) {
    println!(
        "  {}  {}: {} rows, {} upserted, {} deleted, {} rated; index {} (v{})",
        weir_ml::vectors::DATASET,
        r.mode,
        r.rows,
        r.upserted,
        r.deleted,
        r.rated,
        r.index,
        r.version
    );
    let phases: Vec<String> = r.phases.iter().map(|(n, d)| format!("{n} {}", secs(*d))).collect();
    println!("      ({})", phases.join(", "));
}

pub async fn run(a: FeaturesArgs, cfg: &Config) -> Result<()> {
    let lake = crate::settings::open_lake(a.lake.as_deref(), cfg, a.allow_non_eu).await?;
    let sources = super::backfill::load_sources(a.sources.as_deref())?;
    let bronze = sources.names();
    let jobs = load_feature_jobs(a.jobs_dir.as_deref(), a.features_dir.as_deref(), &bronze)?;
    weir_ml::embed::check_dimension(a.dim)?;
    anyhow::ensure!(a.rating_k >= 3, "--rating-k must be at least 3, not {}", a.rating_k);
    let as_of_micros = super::derive::as_of_or_default(a.as_of.as_deref(), &lake, &bronze).await?;
    let opts = DeriveOptions {
        job: None,
        makes: MakeSelection::All,
        as_of_micros,
        full: a.full,
        target_file_bytes: 128 << 20,
    };
    println!("features {} as of {}", lake.url(), show_micros(as_of_micros));
    let t = Instant::now();
    let run =
        build(&lake, &jobs, &bronze, &opts, &RefreshOptions { dim: a.dim, rating_k: a.rating_k, full: a.full }).await?;
    print_reports(&run.reports);
    print_vectors(&run.vectors);
    println!("done in {}", secs(t.elapsed()));
    Ok(())
}

/// Prints the neighbours of one listing and its rating.
pub async fn show_similar(lake: &Lake, listing: i64, k: usize, filter: Option<String>, exact: bool) -> Result<()> {
    let ds = weir_ml::vectors::open(lake)
        .await?
        .with_context(|| format!("{} is not built yet: run `weir features`", weir_ml::vectors::DATASET))?;
    let me = weir_ml::search::similar(
        &ds,
        &weir_ml::search::SimilarRequest {
            query: weir_ml::search::Query::Vector(weir_ml::search::embedding_of(&ds, listing).await?),
            k: 1,
            filter: Some(format!("listing_id = {listing}")),
            columns: vec![],
            exact: true,
        },
    )
    .await?;
    let req = weir_ml::search::SimilarRequest {
        query: weir_ml::search::Query::Listing(listing),
        k,
        filter,
        columns: vec![],
        exact,
    };
    let near = weir_ml::search::similar(&ds, &req).await?;
    println!("  listing {listing}: {}", describe(&me, 0, false));
    for i in 0..near.num_rows() {
        println!("    {}", describe(&near, i, true));
    }
    Ok(())
}

fn describe(b: &arrow::array::RecordBatch, i: usize, with_distance: bool) -> String {
    let text = |name: &str| -> String {
        b.column_by_name(name)
            .and_then(|c| arrow::util::display::array_value_to_string(c, i).ok())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "-".into())
    };
    let rating = match b.column_by_name("price_rating").map(|c| c.as_primitive::<arrow::datatypes::Float64Type>()) {
        Some(r) if r.is_valid(i) => format!("{:.2}× neighbours' median ({})", r.value(i), text("price_rating_label")),
        _ => "no rating".into(),
    };
    let head = if with_distance {
        let d = b.column(1).as_primitive::<arrow::datatypes::Float32Type>().value(i);
        format!("#{} (distance {d:.3}) ", text("listing_id"))
    } else {
        String::new()
    };
    format!(
        "{head}{} {} {}, {} EUR, active {}: {rating}",
        text("country"),
        text("make"),
        text("model"),
        text("price_last_eur"),
        text("is_active")
    )
}

pub async fn similar(a: SimilarArgs, cfg: &Config) -> Result<()> {
    let lake = crate::settings::open_lake(a.lake.as_deref(), cfg, a.allow_non_eu).await?;
    show_similar(&lake, a.listing, a.k, a.filter, a.exact).await
}
