//! Weir's benchmark harness: each hot path measured side by side with its peer, in one run,
//! reported as a ratio. Not a test: run it by hand (see docs/BENCHMARKS.md).
//!
//!   cargo run --release -p weir-benches -- generate --scale 1

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use weir_synth::{GenerateOptions, NoProgress};
use weir_testkit::PgCluster;

mod floor;
mod merge;

#[derive(Debug, Parser)]
#[command(name = "weir-bench", about = "Weir benchmarks, each against its peer in the same run")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// `weir generate` (COPY BINARY from Rust) vs psql `\copy price_log FROM file (FORMAT binary)`.
    Generate {
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Repetitions; the best of each side is reported.
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
    /// `weir backfill` of price_log (--jobs 2) vs psql `\copy price_log TO STDOUT (FORMAT binary)` into /dev/null.
    Backfill {
        #[arg(long, default_value_t = 10.0)]
        scale: f64,
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        #[arg(long, default_value_t = 2)]
        runs: u32,
        /// Rows per chunk (`weir backfill --chunk-rows`); the default is weir's.
        #[arg(long)]
        chunk_rows: Option<u64>,
    },
    /// `weir derive` of ads_<make> from bronze vs DuckDB (PyPI) on the same Parquet files vs the
    /// legacy PostgreSQL build; then Weir's re-derive after a taxonomy change.
    Derive {
        #[arg(long, default_value_t = 10.0)]
        scale: f64,
        #[arg(long, default_value = "vw")]
        make: String,
        #[arg(long, default_value_t = 2)]
        runs: u32,
        /// Taxonomy changes, one after the other, each landed and re-derived and timed as (d).
        #[arg(long, default_value_t = 5)]
        changes: u32,
        /// Keep the lake in this folder (default: a temporary folder).
        #[arg(long)]
        lake_dir: Option<std::path::PathBuf>,
    },
    /// `weir serve`: pyarrow.flight DoGet of ads_<make> (MB/s) and point lookups by listing_id
    /// over Flight SQL (p50/p95), vs psql `\copy ads_<make> to stdout (format binary)` and the
    /// heap table's primary-key lookup, in the same run.
    Serve {
        #[arg(long, default_value_t = 10.0)]
        scale: f64,
        #[arg(long, default_value = "vw")]
        make: String,
        #[arg(long, default_value_t = 3)]
        runs: u32,
        #[arg(long, default_value_t = 200)]
        lookups: u32,
    },
    /// A generated day through CDC (`weir sync`) plus the incremental derive of every mart, vs
    /// the legacy PostgreSQL build of every mart and a full Weir re-derive, in the same run.
    Cdc {
        #[arg(long, default_value_t = 10.0)]
        scale: f64,
        /// Days applied one after the other; the best of each side is reported.
        #[arg(long, default_value_t = 2)]
        runs: u32,
        /// Days applied first, untimed (sync + incremental derive), so that the timed days meet
        /// the lake as days of CDC leave it (more, smaller files; deletion vectors) rather than
        /// as the backfill and the first derive wrote it. 0: a fresh lake.
        #[arg(long, default_value_t = 4)]
        age: u32,
    },
    /// A merge by key into a partitioned table (a CDC day's shape: a tenth of the rows updated
    /// across every file, new keys, a few deletes): Weir's merge-on-read vs delta-rs's MERGE,
    /// on copies of the same table, results compared.
    Merge {
        #[arg(long, default_value_t = 2_000_000)]
        rows: i64,
        /// Distinct existing keys changed (1 in 20 of them deleted); a tenth as many are inserted.
        #[arg(long, default_value_t = 200_000)]
        changes: usize,
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
    /// Freshness lag of `weir run` (the release binary next to this one) under a steady write
    /// load: a writer commits price changes at --rate transactions/s for --seconds; the lag
    /// (source commit → marts committed) p50/p95 is read from `weir run`'s /metrics. The loop vacuums every 30 s (30 s retention), so that long runs fit on the disk.
    Lag {
        #[arg(long, default_value_t = 10.0)]
        scale: f64,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Keep only this make's mart fresh (`weir run --make`); default: every make's.
        #[arg(long)]
        make: Option<String>,
        /// Append `weir run`'s output, with a line per derived table, to this file.
        #[arg(long)]
        run_log: Option<std::path::PathBuf>,
    },
    /// ML: ANN search (IVF_PQ) queries/s and recall@10 vs exact brute-force search over the
    /// vector table; point-in-time retrieval of --pit-rows (listing, timestamp) rows; the
    /// incremental vector refresh after one generated day vs a full rebuild.
    Ml {
        #[arg(long, default_value_t = 10.0)]
        scale: f64,
        /// ANN queries timed (exact search runs on the first --exact of them).
        #[arg(long, default_value_t = 1000)]
        queries: usize,
        #[arg(long, default_value_t = 100)]
        exact: usize,
        #[arg(long, default_value_t = 100_000)]
        pit_rows: usize,
    },
    /// One SQL statement over an existing lake's tables (bronze.*, silver.*, gold.*), timed,
    /// with EXPLAIN ANALYZE: for trying a job's SQL before changing it.
    Query {
        #[arg(long)]
        lake_dir: std::path::PathBuf,
        /// The statement, or @file.
        #[arg(long)]
        sql: String,
        #[arg(long, default_value_t = 3)]
        runs: u32,
        #[arg(long)]
        explain: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // WEIR_LOG (as for `weir`) turns on the libraries' logs, e.g. WEIR_LOG=weir_derive=debug.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG") {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.bench {
        Bench::Generate { scale, seed, runs } => rt.block_on(generate(scale, seed, runs)),
        Bench::Backfill { scale, jobs, runs, chunk_rows } => rt.block_on(backfill(scale, jobs, runs, chunk_rows)),
        Bench::Derive { scale, make, runs, changes, lake_dir } => {
            rt.block_on(derive(scale, &make, runs, changes.max(1), lake_dir))
        }
        Bench::Serve { scale, make, runs, lookups } => rt.block_on(serve(scale, &make, runs, lookups)),
        Bench::Cdc { scale, runs, age } => rt.block_on(cdc(scale, runs, age)),
        Bench::Merge { rows, changes, runs } => rt.block_on(merge::merge(rows, changes, runs)),
        Bench::Lag { scale, seconds, rate, make, run_log } => rt.block_on(lag(scale, seconds, rate, make, run_log)),
        Bench::Ml { scale, queries, exact, pit_rows } => rt.block_on(ml(scale, queries, exact, pit_rows)),
        Bench::Query { lake_dir, sql, runs, explain } => rt.block_on(query(&lake_dir, &sql, runs, explain)),
    }
}

async fn generate(scale: f64, seed: u64, runs: u32) -> Result<()> {
    let pg = tokio::task::spawn_blocking(PgCluster::start).await??;
    let psql = pg.bindir().join("psql");
    let dump = pg.data_dir().parent().context("cluster dir")?.join("price_log.bin");
    let mut weir_best: Option<(Duration, u64, u64)> = None;
    let mut psql_best: Option<Duration> = None;
    for run in 0..runs {
        let db = pg.create_database(&format!("weir_{run}"))?;
        let t = Instant::now();
        let report =
            weir_synth::generate(&db, &GenerateOptions { scale, seed, replace: false }, Arc::new(NoProgress)).await?;
        let wall = t.elapsed();
        let (prices, total) = (report.rows("price_log"), report.tables.iter().map(|(_, n)| n).sum());
        println!(
            "run {run}: weir generate  {:>9.3} s  {prices} price_log rows, {total} rows in all",
            wall.as_secs_f64()
        );
        if weir_best.is_none_or(|(b, _, _)| wall < b) {
            weir_best = Some((wall, prices, total));
        }
        if run == 0 {
            psql_cmd(&psql, &db, &format!("\\copy price_log TO '{}' (FORMAT binary)", dump.display()))?;
        }
        // The peer: the same price_log rows, already encoded, loaded by psql into an empty table.
        let peer = pg.create_database(&format!("psql_{run}"))?;
        psql_cmd(
            &psql,
            &peer,
            "CREATE TABLE price_log (listing_id bigint NOT NULL, changed_at timestamptz NOT NULL, price numeric(12,2) NOT NULL, currency char(3) NOT NULL)",
        )?;
        let t = Instant::now();
        psql_cmd(&psql, &peer, &format!("\\copy price_log FROM '{}' (FORMAT binary)", dump.display()))?;
        let wall = t.elapsed();
        println!(
            "run {run}: psql \\copy      {:>9.3} s  price_log only, from a prepared binary file, no keys",
            wall.as_secs_f64()
        );
        if psql_best.is_none_or(|b| wall < b) {
            psql_best = Some(wall);
        }
    }
    let (w, prices, total) = weir_best.context("no run")?;
    let p = psql_best.context("no run")?;
    let weir_rate = prices as f64 / w.as_secs_f64();
    let psql_rate = prices as f64 / p.as_secs_f64();
    println!();
    println!("scale {scale}, best of {runs}:");
    println!(
        "  weir generate (all 6 tables, {total} rows, generated + encoded + loaded + keys): {:.3} s → {:.0} price_log rows/s",
        w.as_secs_f64(),
        weir_rate
    );
    println!(
        "  psql \\copy FROM binary file (price_log alone, no generation, no keys):   {:.3} s → {:.0} rows/s",
        p.as_secs_f64(),
        psql_rate
    );
    println!("  ratio weir/psql (price_log rows/s): {:.2}", weir_rate / psql_rate);
    Ok(())
}

fn psql_cmd(psql: &Path, url: &str, command: &str) -> Result<()> {
    let out = Command::new(psql).args([url, "-v", "ON_ERROR_STOP=1", "-q", "-c", command]).output()?;
    if !out.status.success() {
        bail!("psql {command}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

async fn backfill(scale: f64, jobs: usize, runs: u32, chunk_rows: Option<u64>) -> Result<()> {
    let pg = tokio::task::spawn_blocking(PgCluster::start).await??;
    let psql = pg.bindir().join("psql");
    let db = pg.create_database("bench")?;
    let t = Instant::now();
    let report =
        weir_synth::generate(&db, &GenerateOptions { scale, seed: 42, replace: false }, Arc::new(NoProgress)).await?;
    let rows = report.rows("price_log");
    println!("generated SF {scale} in {:.1} s: {rows} price_log rows", t.elapsed().as_secs_f64());
    let sources = repo_sources()?;
    let tables = sources.select(Some(&["price_log".to_string()]))?;
    let lake_dir = tempfile_dir(pg.data_dir())?;
    let (mut weir_best, mut psql_best) = (f64::MAX, f64::MAX);
    let hwm_before = vm_hwm_kb();
    for run in 0..runs {
        let lake = weir_lake::Lake::open(
            weir_core::LakeLocation::Local { root: lake_dir.join(format!("lake{run}")) },
            &weir_core::S3Settings::default(),
            false,
        )?;
        let opts = weir_ingest::BackfillOptions {
            jobs,
            slot: weir_ingest::SlotMode::NoSlot,
            chunk_rows,
            ..Default::default()
        };
        let t = Instant::now();
        let r = weir_ingest::backfill(&db, &lake, &tables, &opts, Arc::new(weir_ingest::Metrics::default())).await?;
        let w = t.elapsed().as_secs_f64();
        println!(
            "run {run}: weir backfill --jobs {jobs}   {w:>8.3} s  {} rows, {} chunks ({:.3} s from the first chunk's start to the last's end), {} files, {:.1} MB Parquet",
            r[0].rows,
            r[0].chunks,
            r[0].seconds,
            r[0].files,
            r[0].bytes as f64 / 1e6
        );
        weir_best = weir_best.min(w);
        let t = Instant::now();
        let out = Command::new(&psql)
            .args([db.as_str(), "-v", "ON_ERROR_STOP=1", "-q", "-c", "\\copy price_log to stdout (format binary)"])
            .stdout(std::process::Stdio::null())
            .status()?;
        if !out.success() {
            bail!("psql copy failed");
        }
        let p = t.elapsed().as_secs_f64();
        println!("run {run}: psql \\copy to /dev/null   {p:>8.3} s");
        psql_best = psql_best.min(p);
    }
    println!();
    println!("price_log at SF {scale} ({rows} rows), best of {runs}:");
    println!(
        "  weir backfill --jobs {jobs} (COPY BINARY → Arrow → Parquet zstd → one Delta commit): {weir_best:.3} s, {:.0} rows/s",
        rows as f64 / weir_best
    );
    println!(
        "  psql \\copy price_log to stdout (format binary) > /dev/null (single stream):        {psql_best:.3} s, {:.0} rows/s",
        rows as f64 / psql_best
    );
    println!("  ratio weir/psql wall time: {:.2} (target ≤ 1)", weir_best / psql_best);
    println!(
        "  peak RSS of the bench process: {} MB (before the backfill runs: {} MB)",
        vm_hwm_kb() / 1024,
        hwm_before / 1024
    );
    Ok(())
}

fn tempfile_dir(near: &Path) -> Result<std::path::PathBuf> {
    let dir = near.parent().context("cluster dir")?.join("lakes");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Peak resident set size of this process (VmHWM), in KiB.
fn vm_hwm_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The Python with DuckDB: $WEIR_TOOLS/pyvenv (created by infra/local/pytools.sh), duckdb
/// installed into it on first use.
/// The tools venv's Python (infra/local/pytools.sh); with `duckdb`, DuckDB installed into it.
fn bench_python(duckdb: bool) -> Result<std::path::PathBuf> {
    let out = Command::new("bash").arg("infra/local/pytools.sh").output().context("running infra/local/pytools.sh")?;
    if !out.status.success() {
        bail!("infra/local/pytools.sh: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let python = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let has = !duckdb || Command::new(&python).args(["-c", "import duckdb"]).status()?.success();
    if !has {
        let pip = python.with_file_name("pip");
        let ok = Command::new(pip).args(["install", "-q", "--disable-pip-version-check", "duckdb==2.0.0"]).status()?;
        if !ok.success() {
            bail!("cannot install duckdb==2.0.0 from PyPI");
        }
    }
    Ok(python)
}

async fn query(lake_dir: &Path, sql: &str, runs: u32, explain: bool) -> Result<()> {
    let sql = match sql.strip_prefix('@') {
        Some(f) => std::fs::read_to_string(f).with_context(|| format!("reading {f}"))?,
        None => sql.to_string(),
    };
    let lake = weir_lake::Lake::open(
        weir_core::LakeLocation::Local { root: lake_dir.to_path_buf() },
        &Default::default(),
        false,
    )?;
    let sources = repo_sources()?;
    let bronze = sources.names();
    let mut session = weir_derive::LakeSession::open(&lake, &bronze).await?;
    for t in ["silver/listing_price", "silver/model"] {
        session.register_delta(&lake, &t.replace('/', ".")).await?;
    }
    // Leading statements (SET …;) run once; the last one is timed.
    let mut parts: Vec<&str> = sql.split(';').map(str::trim).filter(|s| !s.is_empty()).collect();
    let sql = parts.pop().context("no SQL")?.to_string();
    for setup in parts {
        session.ctx.sql(setup).await?.collect().await?;
    }
    for run in 0..runs {
        let t = Instant::now();
        let batches = session.ctx.sql(&sql).await?.collect().await?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        println!("run {run}: {:.3} s, {rows} rows", t.elapsed().as_secs_f64());
    }
    if explain {
        let batches = session.ctx.sql(&format!("EXPLAIN ANALYZE {sql}")).await?.collect().await?;
        for b in &batches {
            let plan = arrow_cast_string(b.column(1));
            for p in plan {
                println!("{p}");
            }
        }
    }
    Ok(())
}

fn arrow_cast_string(col: &dyn datafusion_array::Array) -> Vec<String> {
    (0..col.len()).map(|i| datafusion_array::display_value(col, i)).collect()
}

/// The repository's tables/sources.toml.
fn repo_sources() -> Result<weir_ingest::Sources> {
    Ok(weir_ingest::Sources::parse(include_str!("../../tables/sources.toml"), "tables/sources.toml")?)
}

/// A throwaway PostgreSQL with the generated marketplace (seed 42), every table backfilled
/// into a local lake, and the jobs of tables/jobs: what the derive and serve benches share.
struct Landed {
    pg: PgCluster,
    db: String,
    lake: weir_lake::Lake,
    lake_dir: std::path::PathBuf,
    sources: weir_ingest::Sources,
    bronze: Vec<String>,
    jobs: weir_derive::Jobs,
    as_of: chrono::DateTime<chrono::Utc>,
}

async fn landed(scale: f64, lake_dir: Option<std::path::PathBuf>, slot: bool) -> Result<Landed> {
    let pg = tokio::task::spawn_blocking(PgCluster::start).await??;
    let db = pg.create_database("bench")?;
    let t = Instant::now();
    weir_synth::generate(&db, &GenerateOptions { scale, seed: 42, replace: false }, Arc::new(NoProgress)).await?;
    println!("generated SF {scale} in {:.1} s", t.elapsed().as_secs_f64());
    let sources = repo_sources()?;
    let bronze = sources.names();
    let lake_dir = match lake_dir {
        Some(d) => d,
        None => tempfile_dir(pg.data_dir())?.join("lake"),
    };
    let lake =
        weir_lake::Lake::open(weir_core::LakeLocation::Local { root: lake_dir.clone() }, &Default::default(), false)?;
    let slot = if slot {
        weir_ingest::SlotMode::Slot(weir_ingest::default_slot_name(lake.url().as_str()))
    } else {
        weir_ingest::SlotMode::NoSlot
    };
    let opts = weir_ingest::BackfillOptions { slot, ..Default::default() };
    let t = Instant::now();
    weir_ingest::backfill(&db, &lake, &sources.tables, &opts, Arc::new(weir_ingest::Metrics::default())).await?;
    println!("backfilled every table in {:.1} s", t.elapsed().as_secs_f64());
    let jobs = weir_derive::load_dir(Path::new("tables/jobs"), &bronze)?;
    let as_of = chrono::DateTime::from_timestamp_micros(weir_synth::HISTORY_END).context("as_of")?;
    Ok(Landed { pg, db, lake, lake_dir, sources, bronze, jobs, as_of })
}

/// `weir derive --job ads --make <make> [--full]` as of the bench's instant.
fn ads_options(make: &str, as_of: chrono::DateTime<chrono::Utc>, full: bool) -> weir_derive::DeriveOptions {
    weir_derive::DeriveOptions {
        job: Some("ads".into()),
        makes: weir_derive::MakeSelection::One(make.to_string()),
        as_of_micros: as_of.timestamp_micros(),
        full,
        target_file_bytes: 128 << 20,
    }
}

async fn derive(scale: f64, make: &str, runs: u32, changes: u32, keep: Option<std::path::PathBuf>) -> Result<()> {
    let python = bench_python(true)?;
    let Landed { pg: _pg, db, lake, lake_dir, sources, bronze, jobs, as_of } = landed(scale, keep, false).await?;
    let opts = weir_ingest::BackfillOptions { slot: weir_ingest::SlotMode::NoSlot, ..Default::default() };
    let derive_opts = |full: bool| ads_options(make, as_of, full);
    let mut client = weir_postgres::connect(&db).await?;
    let (mut legacy, mut weir, mut duck) = (f64::MAX, f64::MAX, f64::MAX);
    for run in 0..runs {
        let t = Instant::now();
        let r = weir_synth::build_legacy_mart(&mut client, make, as_of).await?;
        let s = t.elapsed().as_secs_f64();
        println!("run {run}: legacy PostgreSQL build       {s:>8.3} s  {} rows", r.rows);
        legacy = legacy.min(s);

        let t = Instant::now();
        let reports = weir_derive::derive(&lake, &jobs, &bronze, &derive_opts(true), |_| {}).await?;
        let s = t.elapsed().as_secs_f64();
        let built: Vec<String> = reports
            .iter()
            .filter_map(|r| match r.outcome {
                weir_derive::JobOutcome::Built { rows, elapsed, .. } => {
                    Some(format!("{} {rows} rows {:.2} s", r.output, elapsed.as_secs_f64()))
                }
                _ => None,
            })
            .collect();
        println!("run {run}: weir derive --make {make} --full {s:>8.3} s  {}", built.join(", "));
        weir = weir.min(s);
    }
    let rows = bench_parity(&client, &lake, &jobs, make, as_of.timestamp_micros()).await?;
    println!("parity: gold.ads_{make} identical to the legacy ads_{make} ({rows} rows)");

    let out = Command::new(&python)
        .arg("benches/py/duckdb_mart.py")
        .arg(&lake_dir)
        .arg(make)
        .arg(as_of.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .arg(runs.to_string())
        .output()
        .context("running benches/py/duckdb_mart.py")?;
    if !out.status.success() {
        bail!("duckdb: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    for (run, line) in String::from_utf8_lossy(&out.stdout).lines().enumerate() {
        let mut w = line.split_whitespace().skip(1);
        let s: f64 = w.next().context("duckdb output")?.parse()?;
        println!("run {run}: duckdb (same Parquet files)      {s:>8.3} s  {} rows", w.next().unwrap_or("?"));
        duck = duck.min(s);
    }

    // Taxonomy changes: each renames one of the make's models and moves another to a new
    // segment; only `models` is landed again, then `weir derive --make` is timed.
    let models = sources.select(Some(&["models".to_string()]))?;
    let force = weir_ingest::BackfillOptions { force: true, ..opts.clone() };
    let mut taxonomy = Vec::new();
    for change in 0..changes {
        client
            .batch_execute(&format!(
                "UPDATE models SET name = name || ' {change}', updated_at = now()
                  WHERE model_id = (SELECT min(model_id) FROM models JOIN makes USING (make_id) WHERE slug = '{make}');
                 UPDATE models SET segment = segment || ' ({change})', updated_at = now()
                  WHERE model_id = (SELECT max(model_id) FROM models JOIN makes USING (make_id) WHERE slug = '{make}');"
            ))
            .await?;
        let t = Instant::now();
        weir_ingest::backfill(&db, &lake, &models, &force, Arc::new(weir_ingest::Metrics::default())).await?;
        let models_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let reports = weir_derive::derive(&lake, &jobs, &bronze, &derive_opts(false), |_| {}).await?;
        let s = t.elapsed().as_secs_f64();
        let rebuilt: Vec<&str> = reports
            .iter()
            .filter(|r| matches!(r.outcome, weir_derive::JobOutcome::Built { .. }))
            .map(|r| r.output.as_str())
            .collect();
        println!(
            "taxonomy change {change}: backfill of models {models_s:.3} s, weir derive {s:.3} s (rebuilt {})",
            rebuilt.join(", ")
        );
        taxonomy.push(s);
    }
    taxonomy.sort_by(f64::total_cmp);
    let (median, worst) = (taxonomy[taxonomy.len() / 2], taxonomy[taxonomy.len() - 1]);
    // The floor: the same derive with nothing changed (open the lake, plan, compare states).
    let t = Instant::now();
    weir_derive::derive(&lake, &jobs, &bronze, &derive_opts(false), |_| {}).await?;
    let floor = t.elapsed().as_secs_f64();
    println!("weir derive with nothing changed: {floor:.3} s");
    let t = Instant::now();
    weir_synth::build_legacy_mart(&mut client, make, as_of).await?;
    let legacy_after = t.elapsed().as_secs_f64();
    bench_parity(&client, &lake, &jobs, make, as_of.timestamp_micros()).await?;
    println!("parity after the taxonomy changes: identical (legacy rebuild took {legacy_after:.3} s)");

    println!();
    println!("ads_{make} at SF {scale}, best of {runs}:");
    println!("  (a) weir derive --make {make} --full from bronze (the make's entities + the mart): {weir:.3} s");
    println!("  (b) duckdb, the mart from the same Parquet files:              {duck:.3} s");
    println!("  (c) legacy PostgreSQL build:                                   {legacy:.3} s");
    println!(
        "  (d) weir re-derive after a taxonomy change, median of {changes}:        {median:.3} s (worst {worst:.3} s; nothing changed: {floor:.3} s)"
    );
    println!(
        "  (a)/(b) = {:.2} (target ≤ 1); (d)/(c) = {:.2} % median, {:.2} % worst (target ≤ 1 %)",
        weir / duck,
        100.0 * median / legacy,
        100.0 * worst / legacy
    );
    Ok(())
}

/// Every mart, as of the bench's instant (`weir derive`, all makes).
fn all_options(as_of: chrono::DateTime<chrono::Utc>, full: bool) -> weir_derive::DeriveOptions {
    weir_derive::DeriveOptions {
        job: None,
        makes: weir_derive::MakeSelection::All,
        as_of_micros: as_of.timestamp_micros(),
        full,
        target_file_bytes: 128 << 20,
    }
}

/// Seconds silver.listing_price took in a derive, if it was brought up to date incrementally
/// (`incremental`) or rebuilt (otherwise).
fn fold_seconds(reports: &[weir_derive::JobReport], incremental: bool) -> Option<f64> {
    let r = reports.iter().find(|r| r.output == "silver.listing_price")?;
    match (&r.outcome, incremental) {
        (weir_derive::JobOutcome::Incremental { elapsed, .. }, true)
        | (weir_derive::JobOutcome::Built { elapsed, .. }, false) => Some(elapsed.as_secs_f64()),
        _ => None,
    }
}

async fn cdc(scale: f64, runs: u32, age: u32) -> Result<()> {
    let Landed { pg: _pg, db, lake, lake_dir, sources, bronze, jobs, as_of } = landed(scale, None, true).await?;
    let mut client = weir_postgres::connect(&db).await?;
    let slugs = weir_synth::list_make_slugs(&client).await?;
    let t = Instant::now();
    weir_derive::derive(&lake, &jobs, &bronze, &all_options(as_of, false), |_| {}).await?;
    println!("first derive of every mart: {:.3} s ({} makes)", t.elapsed().as_secs_f64(), slugs.len());
    let sync_opts = weir_ingest::SyncOptions::new(weir_ingest::default_slot_name(lake.url().as_str()));
    // The floor's decode with the memory the sync decodes with (a day that spills is slower).
    if let Some(size) = &sync_opts.decoding_work_mem {
        weir_ingest::set_decoding_work_mem(&client, size).await?;
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    // The lake aged by `age` days first: after the backfill and the first derive every table
    // is a few large files; each day of merges adds files and deletion vectors until the
    // merges' own rewriting (a file half deleted, small files folded) holds them steady.
    let t = Instant::now();
    for d in 0..age {
        let date = (as_of + chrono::Duration::days(i64::from(d) + 1)).date_naive();
        let options = weir_synth::DayOptions { date, seed: 800 + u64::from(d), taxonomy_rate: 0.0 };
        weir_synth::apply_day(&db, &options).await?;
        weir_ingest::sync(&db, &lake, &sources.tables, &sync_opts, &stop, |_| {}).await?;
        weir_derive::derive(&lake, &jobs, &bronze, &all_options(as_of, false), |_| {}).await?;
    }
    let mut layout = Vec::new();
    for rel in ["bronze/listings", "bronze/price_log", "silver/listing_price", "silver/ads_base"] {
        layout.push(format!("{rel} {} files", active_files(&lake, rel).await?));
    }
    println!(
        "lake aged by {age} day(s) of sync + derive ({:.1} s, untimed): {}",
        t.elapsed().as_secs_f64(),
        layout.join(", ")
    );
    let (mut inc, mut legacy, mut full) = (f64::MAX, f64::MAX, f64::MAX);
    let (mut fold_inc, mut fold_full) = (f64::MAX, f64::MAX);
    let (mut floor_decode, mut floor_encode) = (f64::MAX, f64::MAX);
    for run in 0..runs {
        let date = (as_of + chrono::Duration::days(i64::from(age + run) + 1)).date_naive();
        let day = weir_synth::apply_day(
            &db,
            &weir_synth::DayOptions { date, seed: 900 + u64::from(run), taxonomy_rate: 0.0 },
        )
        .await?;
        // The floor, part 1: PostgreSQL decoding the day through the slot, the client only
        // counting. Decoding reads flushed WAL only, and the cluster commits asynchronously
        // (synchronous_commit = off): wait for the day's commit record to be flushed first.
        let end: String = client.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await?.get(0);
        while !client
            .query_one("SELECT pg_current_wal_flush_lsn() >= $1::text::pg_lsn", &[&end])
            .await?
            .get::<_, bool>(0)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t = Instant::now();
        let messages: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL,
                     'proto_version', '1', 'publication_names', $2, 'binary', 'true')",
                &[&sync_opts.slot, &sync_opts.slot],
            )
            .await?
            .get(0);
        let decode_s = t.elapsed().as_secs_f64();
        let before = floor::versions(&lake, &lake_dir).await?;
        let t = Instant::now();
        let report = weir_ingest::sync(&db, &lake, &sources.tables, &sync_opts, &stop, |_| {}).await?;
        let sync_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let reports = weir_derive::derive(&lake, &jobs, &bronze, &all_options(as_of, false), |_| {}).await?;
        let derive_s = t.elapsed().as_secs_f64();
        let fold = fold_seconds(&reports, true);
        let Some(fold) = fold else { bail!("silver.listing_price was not brought up to date incrementally") };
        if let Some(r) = reports.iter().find(|r| r.output == "silver.listing_price") {
            println!("run {run}: listing_price: {}", r.reason);
        }
        println!(
            "run {run}: day {date} ({} new listings, {} updated, {} price rows): weir sync {sync_s:.3} s ({} changes) + weir derive {derive_s:.3} s (listing_price incremental {fold:.3} s) = {:.3} s",
            day.new_listings,
            day.updated,
            day.price_rows,
            report.changes,
            sync_s + derive_s
        );
        inc = inc.min(sync_s + derive_s);
        fold_inc = fold_inc.min(fold);
        // The floor, part 2: encoding the rows the day changed, once, alone.
        let tables = floor::encode_floor(&lake, &lake_dir, &before).await?;
        let encode_s: f64 = tables.iter().map(|t| t.encode.as_secs_f64()).sum();
        let changed: u64 = tables.iter().map(|t| t.rows_changed).sum();
        let written: u64 = tables.iter().map(|t| t.rows_written).sum();
        println!(
            "run {run}: floor: PostgreSQL's decode of the day's {messages} messages {decode_s:.3} s; Parquet encoding of the {changed} rows it changed in {} tables {encode_s:.3} s (the day's commits wrote {written} rows); together {:.3} s",
            tables.len(),
            decode_s + encode_s
        );
        for t in tables.iter().take(6) {
            println!(
                "run {run}:   {}: {} rows changed of {} written, encoded in {:.3} s",
                t.table,
                t.rows_changed,
                t.rows_written,
                t.encode.as_secs_f64()
            );
        }
        floor_decode = floor_decode.min(decode_s);
        floor_encode = floor_encode.min(encode_s);

        let t = Instant::now();
        for s in &slugs {
            weir_synth::build_legacy_mart(&mut client, s, as_of).await?;
        }
        let legacy_s = t.elapsed().as_secs_f64();
        println!("run {run}: legacy PostgreSQL build of every mart {legacy_s:.3} s");
        legacy = legacy.min(legacy_s);
        for s in &slugs {
            bench_parity(&client, &lake, &jobs, s, as_of.timestamp_micros()).await?;
        }
        println!("run {run}: parity: every mart identical to its legacy table");
        // The legacy build wrote its marts through PostgreSQL's WAL. Nothing of it is
        // published, but the slot still decodes it: `weir run` would have done so while it
        // was written. Untimed here, so that the next day's timed sync starts after it.
        weir_ingest::sync(&db, &lake, &sources.tables, &sync_opts, &stop, |_| {}).await?;

        let t = Instant::now();
        let reports = weir_derive::derive(&lake, &jobs, &bronze, &all_options(as_of, true), |_| {}).await?;
        let full_s = t.elapsed().as_secs_f64();
        let fold = fold_seconds(&reports, false);
        println!(
            "run {run}: weir derive --full (every mart) {full_s:.3} s (listing_price {:.3} s)",
            fold.unwrap_or(f64::NAN)
        );
        full = full.min(full_s);
        fold_full = fold_full.min(fold.unwrap_or(f64::MAX));
    }
    println!();
    println!("every mart at SF {scale}, one generated day, best of {runs}, on a lake aged by {age} day(s):");
    println!("  (a) weir sync + incremental weir derive:  {inc:.3} s (the price-log fold alone: {fold_inc:.3} s)");
    println!("  (b) full weir re-derive:                  {full:.3} s (the price-log fold alone: {fold_full:.3} s)");
    println!("  (c) legacy PostgreSQL build:              {legacy:.3} s");
    println!(
        "  floor: PostgreSQL's decode {floor_decode:.3} s + encoding the changed rows {floor_encode:.3} s = {:.3} s = {:.1} % of (c)",
        floor_decode + floor_encode,
        100.0 * (floor_decode + floor_encode) / legacy
    );
    println!(
        "  (a)/(c) = {:.1} % (target ≤ 2 %); (a)/(b) = {:.1} %; fold incremental/full = {:.1} %",
        100.0 * inc / legacy,
        100.0 * inc / full,
        100.0 * fold_inc / fold_full
    );
    Ok(())
}

async fn http_get(port: u16, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    Ok(text.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

/// A file to append a child's output to, or nowhere.
fn log_to(path: Option<&std::path::Path>) -> Result<std::process::Stdio> {
    Ok(match path {
        Some(p) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("opening {}", p.display()))?
            .into(),
        None => std::process::Stdio::null(),
    })
}

async fn lag(
    scale: f64,
    seconds: u64,
    rate: f64,
    make: Option<String>,
    run_log: Option<std::path::PathBuf>,
) -> Result<()> {
    let Landed { pg: _pg, db, lake, lake_dir, bronze, jobs, .. } = landed(scale, None, true).await?;
    let as_of = weir_derive::run::default_as_of(&lake, &bronze).await?.context("no bronze tables")?;
    let opts = weir_derive::DeriveOptions { as_of_micros: as_of, ..all_options(chrono::Utc::now(), false) };
    let t = Instant::now();
    weir_derive::derive(&lake, &jobs, &bronze, &opts, |_| {}).await?;
    println!("first derive of every mart: {:.3} s", t.elapsed().as_secs_f64());
    let weir = std::env::current_exe()?.with_file_name("weir");
    if !weir.exists() {
        bail!("{} is missing: cargo build --release -p weir-cli", weir.display());
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut child = Command::new(&weir)
        .args(["run", "--pg", &db, "--lake", &format!("file://{}", lake_dir.display()), "--addr", "127.0.0.1:0"])
        .args(["--status-addr", &format!("127.0.0.1:{port}"), "--poll-ms", "100"])
        // Copy-on-write retires tens of MB a cycle: a long run must vacuum to fit on the disk.
        .args(["--vacuum-every", "30s", "--retain", "30s"])
        .args(make.iter().flat_map(|m| ["--make", m.as_str()]))
        .env(
            "WEIR_SERVE_TOKEN",
            format!("bench-{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos()),
        )
        .env("WEIR_LOG", if run_log.is_some() { "warn,deltalake_core=off,weir=debug" } else { "warn" })
        .stdout(log_to(run_log.as_deref())?)
        .stderr(log_to(run_log.as_deref())?)
        .spawn()
        .context("starting weir run")?;
    for _ in 0..100 {
        if http_get(port, "/health").await.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The writer: one transaction per tick, a new price for a listing and its price_last.
    let client = weir_postgres::connect(&db).await?;
    let max: i64 = client.query_one("SELECT max(listing_id) FROM listings", &[]).await?.get(0);
    let files_before = active_files(&lake, "bronze/price_log").await?;
    let started = Instant::now();
    let tick = std::time::Duration::from_secs_f64(1.0 / rate.max(0.1));
    let mut n = 0u64;
    while started.elapsed() < std::time::Duration::from_secs(seconds) {
        let id = 21 + (n.wrapping_mul(2_654_435_761) % (max as u64 - 20)) as i64;
        client
            .batch_execute(&format!(
                "BEGIN;
                 INSERT INTO price_log SELECT listing_id, clock_timestamp(), 1000 + {n} % 50000, 'EUR' FROM listings
                  WHERE listing_id = {id};
                 UPDATE listings SET mileage_km = coalesce(mileage_km, 0) + 1, updated_at = clock_timestamp()
                  WHERE listing_id = {id};
                 COMMIT;"
            ))
            .await?;
        n += 1;
        tokio::time::sleep(tick).await;
    }
    println!("writer: {n} transactions in {:.1} s", started.elapsed().as_secs_f64());
    // Let the loop catch up, then read its figures.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let metrics = http_get(port, "/metrics").await?;
    let health = http_get(port, "/health").await?;
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    let get =
        |name: &str| metrics.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok()));
    println!("weir run /health: {}", health.trim());
    println!();
    println!(
        "freshness lag at SF {scale}, {rate} transactions/s for {seconds} s (source commit → {} committed):",
        make.as_deref().map_or("every mart".to_string(), |m| format!("ads_{m}"))
    );
    println!(
        "  p50 {:.2} s, p95 {:.2} s over {} derive cycles (target p95 ≤ 5 s)",
        get("weir_freshness_lag_p50_seconds ").unwrap_or(f64::NAN),
        get("weir_freshness_lag_p95_seconds ").unwrap_or(f64::NAN),
        get("weir_derive_runs_total ").unwrap_or(f64::NAN)
    );
    // A file appended per cycle would pile up; the sync folds them (FOLD_APPENDED_FILES).
    println!(
        "  bronze.price_log: {} active files after the run, {files_before} before it",
        active_files(&lake, "bronze/price_log").await?
    );
    Ok(())
}

/// How many files a Delta table's current version holds.
async fn active_files(lake: &weir_lake::Lake, rel: &str) -> Result<usize> {
    let table = weir_lake::open_table(lake, rel).await?;
    Ok(table.snapshot()?.log_data().num_files())
}

async fn bench_parity(
    c: &tokio_postgres::Client,
    lake: &weir_lake::Lake,
    jobs: &weir_derive::Jobs,
    make: &str,
    as_of: i64,
) -> Result<u64> {
    let opts =
        weir_derive::ParityOptions { slug: make.to_string(), legacy_table: None, show: 3, expect_as_of: Some(as_of) };
    let r = weir_derive::parity(c, lake, jobs, &opts).await?;
    if !r.identical() {
        bail!("parity failed:\n{}", r.render());
    }
    Ok(r.legacy_rows)
}

mod datafusion_array {
    pub use arrow::array::Array;

    pub fn display_value(col: &dyn Array, i: usize) -> String {
        arrow::util::display::array_value_to_string(col, i).unwrap_or_default()
    }
}

async fn serve(scale: f64, make: &str, runs: u32, lookups: u32) -> Result<()> {
    let python = bench_python(false)?;
    let Landed { pg, db, lake, bronze, jobs, as_of, .. } = landed(scale, None, false).await?;
    weir_derive::derive(&lake, &jobs, &bronze, &ads_options(make, as_of, false), |_| {}).await?;
    let mut client = weir_postgres::connect(&db).await?;
    weir_synth::build_legacy_mart(&mut client, make, as_of).await?;
    // The lookups: ids of the mart, spread evenly (the same ids for both sides).
    let all: Vec<i64> = client
        .query(&format!("SELECT listing_id FROM ads_{make} ORDER BY listing_id"), &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let step = (all.len() / lookups.max(1) as usize).max(1);
    let ids: Vec<i64> = all.iter().step_by(step).take(lookups as usize).copied().collect();

    let settings = weir_core::ServeSettings {
        users: vec![weir_core::ServeUser { name: "bench".into(), password: "bench".into() }],
        ..Default::default()
    };
    let sopts = weir_flight::ServeOptions {
        addr: "127.0.0.1:0".into(),
        memory_limit_bytes: 2 << 30,
        refresh: Duration::from_secs(5),
        tls: None,
    };
    let catalog = weir_flight::Catalog::new(lake.clone(), jobs, sopts.refresh, sopts.memory_limit_bytes);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let auth = weir_flight::Auth::new(&settings)?;
    tokio::spawn(async move {
        let _ = weir_flight::serve(
            catalog,
            auth,
            &sopts,
            |a| {
                let _ = tx.send(a);
            },
            std::future::pending(),
        )
        .await;
    });
    let addr = rx.await?;
    let out = Command::new(&python)
        .arg("benches/py/flight_read.py")
        .args([addr.port().to_string(), "bench".into(), "bench".into(), runs.to_string()])
        .arg(ids.iter().map(i64::to_string).collect::<Vec<_>>().join(","))
        .output()
        .context("running benches/py/flight_read.py")?;
    if !out.status.success() {
        bail!("flight_read.py: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let (mut best, mut rows, mut bytes) = (f64::MAX, 0u64, 0u64);
    let mut lat: Vec<f64> = vec![];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(rest) = line.strip_prefix("{\"full\": ") {
            let secs: f64 = rest.split(',').next().unwrap_or("0").trim().parse()?;
            let num = |k: &str| -> u64 {
                line.split(&format!("\"{k}\": "))
                    .nth(1)
                    .and_then(|r| r.split(['}', ',']).next())
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0)
            };
            println!(
                "flight DoGet of ads_{make}: {secs:.3} s, {} rows, {:.1} MB",
                num("rows"),
                num("bytes") as f64 / 1e6
            );
            if secs < best {
                (best, rows, bytes) = (secs, num("rows"), num("bytes"));
            }
        } else if let Some(rest) = line.strip_prefix("{\"lookups_ms\": [") {
            lat = rest.trim_end_matches("]}").split(',').filter_map(|v| v.trim().parse().ok()).collect();
        }
    }
    let psql = pg.bindir().join("psql");
    let mut copy_best = f64::MAX;
    for _ in 0..runs {
        let t = Instant::now();
        let ok = Command::new(&psql)
            .args([db.as_str(), "-q", "-c", &format!("\\copy ads_{make} to stdout (format binary)")])
            .stdout(std::process::Stdio::null())
            .status()?;
        if !ok.success() {
            bail!("psql copy failed");
        }
        copy_best = copy_best.min(t.elapsed().as_secs_f64());
    }
    let stmt = client.prepare(&format!("SELECT * FROM ads_{make} WHERE listing_id = $1")).await?;
    let mut pg_lat = vec![];
    for id in &ids {
        let t = Instant::now();
        client.query(&stmt, &[id]).await?;
        pg_lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // The FDW (when installed): a full scan and the same point lookups through weir_fdw.
    let fdw: Option<(f64, Vec<f64>)> = {
        let available: bool = client
            .query_one("SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'weir_fdw')", &[])
            .await?
            .get(0);
        if available {
            let cols: Vec<String> = weir_synth::legacy::MART_COLUMNS.iter().map(|(n, t)| format!("{n} {t}")).collect();
            client
                .batch_execute(&format!(
                    "CREATE EXTENSION IF NOT EXISTS weir_fdw;
                     CREATE SERVER bench FOREIGN DATA WRAPPER weir_fdw OPTIONS (url 'grpc://{addr}');
                     CREATE USER MAPPING FOR CURRENT_USER SERVER bench OPTIONS (user 'bench', password 'bench');
                     CREATE FOREIGN TABLE lake_ads ({cols}) SERVER bench OPTIONS (table 'gold.ads_{make}');",
                    cols = cols.join(", ")
                ))
                .await?;
            let mut scan = f64::MAX;
            for _ in 0..runs {
                let t = Instant::now();
                let ok = Command::new(&psql)
                    .args([db.as_str(), "-q", "-c", "\\copy (SELECT * FROM lake_ads) to stdout (format binary)"])
                    .stdout(std::process::Stdio::null())
                    .status()?;
                if !ok.success() {
                    bail!("psql copy through the FDW failed");
                }
                scan = scan.min(t.elapsed().as_secs_f64());
            }
            // A cached generic plan cannot run twice through the FDW framework (README): plan
            // each lookup, as an unprepared query would be.
            client.batch_execute("SET plan_cache_mode = force_custom_plan").await?;
            let stmt = client.prepare("SELECT * FROM lake_ads WHERE listing_id = $1").await?;
            let mut lat = vec![];
            for id in &ids {
                let t = Instant::now();
                let rows = client.query(&stmt, &[id]).await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                if rows.len() != 1 {
                    bail!("the FDW returned {} rows for listing {id}", rows.len());
                }
            }
            Some((scan, lat))
        } else {
            println!("weir_fdw is not installed in this PostgreSQL: the FDW side is skipped (infra/local/fdw.sh)");
            None
        }
    };
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
    };
    println!();
    println!("ads_{make} at SF {scale} ({rows} rows), best of {runs}:");
    println!(
        "  Flight DoGet with pyarrow (SELECT * FROM ads_{make}): {best:.3} s, {:.1} MB/s, {:.0} rows/s",
        bytes as f64 / 1e6 / best,
        rows as f64 / best
    );
    println!(
        "  psql \\copy ads_{make} to stdout (format binary) > /dev/null: {copy_best:.3} s, {:.0} rows/s",
        rows as f64 / copy_best
    );
    println!("  ratio Flight/psql wall: {:.2}", best / copy_best);
    println!(
        "  point lookup by listing_id ({} ids of the mart): Flight SQL (GetFlightInfo + DoGet) p50 {:.1} ms p95 {:.1} ms; PostgreSQL primary key (prepared) p50 {:.2} ms p95 {:.2} ms",
        ids.len(),
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.95),
        pct(&mut pg_lat, 0.5),
        pct(&mut pg_lat, 0.95)
    );
    if let Some((scan, mut lat)) = fdw {
        println!(
            "  FDW full scan (psql \\copy (SELECT * FROM lake_ads) …): {scan:.3} s vs the heap table {copy_best:.3} s → ratio {:.2} (target ≤ 1.5)",
            scan / copy_best
        );
        println!(
            "  FDW point lookup by listing_id (pushed down): p50 {:.1} ms p95 {:.1} ms (target p95 ≤ 20 ms)",
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.95)
        );
    }
    Ok(())
}

/// The entity jobs plus tables/features, as `weir features` loads them.
fn feature_jobs(bronze: &[String]) -> Result<weir_derive::Jobs> {
    let mut all = weir_derive::jobs::parse_dir(Path::new("tables/jobs"))?;
    all.extend(weir_derive::jobs::parse_dir(Path::new("tables/features"))?);
    Ok(weir_derive::jobs::order(all, bronze)?)
}

async fn features_at(
    lake: &weir_lake::Lake,
    jobs: &weir_derive::Jobs,
    bronze: &[String],
    as_of: chrono::DateTime<chrono::Utc>,
) -> Result<f64> {
    let t = Instant::now();
    let opts = weir_derive::DeriveOptions { job: None, ..all_options(as_of, false) };
    for r in weir_ml::build_features(lake, jobs, bronze, &opts, |_| {}).await? {
        let took = match r.outcome {
            weir_derive::JobOutcome::Built { elapsed, .. }
            | weir_derive::JobOutcome::Incremental { elapsed, .. }
            | weir_derive::JobOutcome::Versioned { elapsed, .. } => elapsed,
            _ => continue,
        };
        println!("  {}: {:.3} s", r.output, took.as_secs_f64());
    }
    Ok(t.elapsed().as_secs_f64())
}

fn phases(r: &weir_ml::vectors::RefreshReport) -> String {
    r.phases.iter().map(|(n, d)| format!("{n} {:.2} s", d.as_secs_f64())).collect::<Vec<_>>().join(", ")
}

async fn ml(scale: f64, queries: usize, exact: usize, pit_rows: usize) -> Result<()> {
    use weir_ml::search::{Query, SimilarRequest};
    let Landed { pg: _pg, db, lake, lake_dir: _, sources, bronze, jobs: _, as_of } = landed(scale, None, true).await?;
    let jobs = feature_jobs(&bronze)?;
    let secs = features_at(&lake, &jobs, &bronze, as_of).await?;
    println!("feature jobs (entities, gold.listing_features, gold.segment_price), first build: {secs:.3} s");
    let opts = weir_ml::vectors::RefreshOptions::default();
    let t = Instant::now();
    let full0 = weir_ml::vectors::refresh(&lake, &opts).await?;
    println!("vector table, first build: {:.3} s ({} rows; {})", t.elapsed().as_secs_f64(), full0.rows, phases(&full0));

    // ANN vs exact.
    let ds = weir_ml::vectors::open(&lake).await?.context("the vector table")?;
    let ids: Vec<i64> = {
        let mut scan = ds.scan();
        scan.project(&["listing_id"])?;
        let b = scan.try_into_batch().await?;
        let a = b.column(0).as_any().downcast_ref::<arrow::array::Int64Array>().context("listing_id")?;
        a.values().to_vec()
    };
    let step = (ids.len() / queries.max(1)).max(1);
    let probes: Vec<i64> = ids.iter().step_by(step).take(queries).copied().collect();
    let req = |id, exact| SimilarRequest { query: Query::Listing(id), k: 10, filter: None, columns: vec![], exact };
    let ids_of = |b: &arrow::array::RecordBatch| -> Vec<i64> {
        b.column(0).as_any().downcast_ref::<arrow::array::Int64Array>().map(|a| a.values().to_vec()).unwrap_or_default()
    };
    let mut approx = Vec::new();
    let t = Instant::now();
    for &id in &probes {
        approx.push(ids_of(&weir_ml::search::similar(&ds, &req(id, false)).await?));
    }
    let ann_qps = probes.len() as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut hits = 0usize;
    let n_exact = exact.min(probes.len());
    for (i, &id) in probes.iter().take(n_exact).enumerate() {
        let truth = ids_of(&weir_ml::search::similar(&ds, &req(id, true)).await?);
        hits += approx[i].iter().filter(|x| truth.contains(x)).count();
    }
    let exact_qps = n_exact as f64 / t.elapsed().as_secs_f64();
    let recall = hits as f64 / (10 * n_exact) as f64;

    // Point in time: a day later there are two versions of the changed listings.
    let date = (as_of + chrono::Duration::days(1)).date_naive();
    let day = weir_synth::apply_day(&db, &weir_synth::DayOptions { date, seed: 901, taxonomy_rate: 0.0 }).await?;
    let sync_opts = weir_ingest::SyncOptions::new(weir_ingest::default_slot_name(lake.url().as_str()));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let t = Instant::now();
    let synced = weir_ingest::sync(&db, &lake, &sources.tables, &sync_opts, &stop, |_| {}).await?;
    println!(
        "day {date}: {} new listings, {} updated, {} price rows; weir sync {:.3} s ({} changes)",
        day.new_listings,
        day.updated,
        day.price_rows,
        t.elapsed().as_secs_f64(),
        synced.changes
    );
    let next = as_of + chrono::Duration::days(1);
    let secs = features_at(&lake, &jobs, &bronze, next).await?;
    println!("feature jobs after the day (incremental fold, new versions only): {secs:.3} s");
    let t = Instant::now();
    let inc = weir_ml::vectors::refresh(&lake, &opts).await?;
    let inc_s = t.elapsed().as_secs_f64();
    println!("vector refresh after the day: {inc_s:.3} s — {} ({}); index {}", inc.mode, phases(&inc), inc.index);
    let t = Instant::now();
    let full =
        weir_ml::vectors::refresh(&lake, &weir_ml::vectors::RefreshOptions { full: true, ..opts.clone() }).await?;
    let full_s = t.elapsed().as_secs_f64();
    println!("vector full rebuild: {full_s:.3} s ({})", phases(&full));

    let start = as_of.timestamp_micros() - 86_400_000_000;
    let span = 3 * 86_400_000_000i64;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next_u64 = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut rid, mut rts) = (Vec::with_capacity(pit_rows), Vec::with_capacity(pit_rows));
    for _ in 0..pit_rows {
        rid.push(ids[(next_u64() % ids.len() as u64) as usize]);
        rts.push(start + (next_u64() % span as u64) as i64);
    }
    let request = arrow::array::RecordBatch::try_from_iter(vec![
        ("listing_id", Arc::new(arrow::array::Int64Array::from(rid)) as arrow::array::ArrayRef),
        ("ts", Arc::new(arrow::array::TimestampMicrosecondArray::from(rts).with_timezone("UTC"))),
    ])?;
    let t = Instant::now();
    let store = weir_ml::pit::FeatureStore::open(&lake).await?;
    let open_s = t.elapsed().as_secs_f64();
    let mut pit = f64::MAX;
    let mut found = 0;
    for _ in 0..3 {
        let t = Instant::now();
        let out = store.retrieve(&request).await?;
        pit = pit.min(t.elapsed().as_secs_f64());
        found = out.num_rows() - out.column_by_name("feature_valid_from").map_or(0, |c| c.null_count());
    }
    println!();
    println!("ML at SF {scale} ({} listings in the vector table, dim {}):", inc.rows, opts.dim);
    println!(
        "  ANN (IVF_PQ, nprobes {}, refine {}): {ann_qps:.0} queries/s; exact flat search {exact_qps:.1} queries/s → {:.1}x; recall@10 {recall:.3} over {n_exact} queries",
        weir_ml::search::NPROBES,
        weir_ml::search::REFINE,
        ann_qps / exact_qps
    );
    println!(
        "  point-in-time retrieval of {pit_rows} (listing, ts) rows: {pit:.3} s (best of 3; opening the tables {open_s:.3} s); {found} rows had a version"
    );
    println!(
        "  vector refresh after one day: incremental {inc_s:.3} s vs full rebuild {full_s:.3} s → {:.1} %",
        100.0 * inc_s / full_s
    );
    Ok(())
}
