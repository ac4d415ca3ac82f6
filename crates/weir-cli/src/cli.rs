//! The command line. Every subcommand has a one-line description shown by `weir --help`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "weir",
    version,
    about = "Weir: PostgreSQL history into an EU lakehouse (Delta, DataFusion, Lance, Flight SQL)"
)]
pub struct Cli {
    /// Configuration file (default: ./weir.toml when present).
    #[arg(long, global = true, env = "WEIR_CONFIG")]
    pub config: Option<PathBuf>,
    /// More log output on stderr (-v info, -vv debug); WEIR_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole chain on embedded defaults: a throwaway Postgres, generated data, the legacy mart.
    Demo(DemoArgs),
    /// Create and fill the source marketplace in PostgreSQL (or apply one day of change).
    Generate(GenerateCmd),
    /// Land the source tables as Delta tables from one consistent snapshot: parallel, resumable.
    Backfill(BackfillArgs),
    /// Apply PostgreSQL's changes since the backfill to the bronze tables (logical replication, exactly once).
    Sync(SyncArgs),
    /// The continuous loop: CDC into bronze, incremental derivations, Flight SQL, status and freshness metrics.
    Run(RunArgs),
    /// Run the jobs in tables/jobs over the lake: silver entities and gold marts, incrementally.
    Derive(DeriveArgs),
    /// ML: the feature tables of tables/features (point-in-time versions), the Lance vector table and its index, the price rating.
    Features(FeaturesArgs),
    /// The listings nearest to one listing in the vector table, and its price rating.
    Similar(SimilarArgs),
    /// Compare a mart in the lake with the legacy table in PostgreSQL: counts, checksums, first differences.
    Parity(ParityArgs),
    /// Serve every lake table and view over Arrow Flight SQL (ADBC, pyarrow, JDBC clients).
    Serve(ServeArgs),
    /// Install the weir_fdw foreign-data wrapper in PostgreSQL and put ads_<make> views over the lake (or roll back).
    #[command(subcommand)]
    Fdw(FdwCmd),
    /// The legacy mart pipeline inside PostgreSQL, kept as the reference for parity.
    #[command(subcommand)]
    Legacy(LegacyCmd),
    /// Check that a lake can hold Weir's tables: read/write, one-winner commits, Delta, Lance.
    Doctor(DoctorArgs),
    /// Delete the files the lake's tables no longer need (removed, old change data, old vector versions).
    Vacuum(VacuumArgs),
    /// Start the local services (PostgreSQL 15 and the S3 server) in the foreground and print their settings.
    Services(ServicesArgs),
    /// Run the in-repo S3-compatible server (s3s-fs with per-key locking) for local use.
    S3Server(S3ServerArgs),
}

#[derive(Debug, Args)]
pub struct PgArg {
    /// Source PostgreSQL URL, e.g. postgres://user@host:5432/db (or WEIR_PG_URL, or pg_url in weir.toml).
    #[arg(long = "pg", env = "WEIR_PG_URL", hide_env_values = true)]
    pub pg: Option<String>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct GenerateCmd {
    #[command(subcommand)]
    pub day: Option<GenerateSub>,
    #[command(flatten)]
    pub args: GenerateArgs,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub pg: PgArg,
    /// Scale factor: 1 ≈ 100k listings and ~1M price_log rows.
    #[arg(long, default_value = "1", allow_negative_numbers = true)]
    pub scale: String,
    /// Random seed: the same seed gives the same bytes.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Drop an existing marketplace first.
    #[arg(long)]
    pub replace: bool,
}

#[derive(Debug, Subcommand)]
pub enum GenerateSub {
    /// Apply one day of production-like change (new, updated, deleted listings, prices, fx, taxonomy).
    Day(DayArgs),
}

#[derive(Debug, Args)]
pub struct DayArgs {
    #[command(flatten)]
    pub pg: PgArg,
    /// The day to apply (YYYY-MM-DD), after the latest day in the data.
    #[arg(long)]
    pub date: String,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Probability that the day carries a taxonomy change (0..1).
    #[arg(long, default_value_t = 0.3)]
    pub taxonomy_rate: f64,
}

#[derive(Debug, Subcommand)]
pub enum LegacyCmd {
    /// Build ads_<slug> inside PostgreSQL with plain SQL (TRUNCATE + INSERT), as the old job does.
    Build(LegacyBuildArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["make", "all_makes"])))]
pub struct LegacyBuildArgs {
    #[command(flatten)]
    pub pg: PgArg,
    /// Make slug, e.g. vw or mercedes_benz.
    #[arg(long)]
    pub make: Option<String>,
    /// Every make in the makes table.
    #[arg(long)]
    pub all_makes: bool,
    /// The reference instant (days_online counts to here), e.g. 2026-07-01T00:00:00Z.
    #[arg(long)]
    pub as_of: String,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Leave the services running at the end and print how to connect.
    #[arg(long)]
    pub keep: bool,
    /// Scale factor of the generated marketplace.
    #[arg(long, default_value = "0.1")]
    pub scale: String,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The make whose mart is built.
    #[arg(long, default_value = "vw")]
    pub make: String,
    /// The demo's local lake.
    #[arg(long, default_value = "file://./.weir/lake")]
    pub lake: String,
}

#[derive(Debug, Args)]
pub struct VacuumArgs {
    /// Lake URI: file://path or s3://bucket/prefix (or WEIR_LAKE, or lake in weir.toml).
    #[arg(long, env = "WEIR_LAKE")]
    pub lake: Option<String>,
    /// Keep files removed less than this long ago (e.g. 30m, 1h, 7d): longer than the longest
    /// query or write. Change data is kept twice as long (at most an hour more).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub retain: std::time::Duration,
    /// Only these tables (comma-separated, e.g. gold/ads_vw,bronze.listings); default: every
    /// Delta table under bronze/, silver/ and gold/, and the vector table's old versions.
    #[arg(long, value_delimiter = ',')]
    pub tables: Vec<String>,
    /// Count what would be deleted; delete nothing (the vector table is not counted).
    #[arg(long)]
    pub dry_run: bool,
    /// Accept an S3 bucket outside the EU.
    #[arg(long)]
    pub allow_non_eu: bool,
}

/// `90s`, `30m`, `1h`, `7d` (a number and a unit).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("invalid duration {s:?}: use a number and a unit, e.g. 30m or 1h"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("invalid duration {s:?}: the unit must be s, m, h or d")),
    };
    Ok(std::time::Duration::from_secs(n.saturating_mul(secs)))
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Lake URI: file://path or s3://bucket/prefix (or WEIR_LAKE, or lake in weir.toml).
    #[arg(long, env = "WEIR_LAKE")]
    pub lake: Option<String>,
    /// Accept an S3 bucket outside the EU.
    #[arg(long)]
    pub allow_non_eu: bool,
}

#[derive(Debug, Args)]
pub struct S3ServerArgs {
    /// Directory holding one sub-directory per bucket.
    pub root: PathBuf,
    #[arg(long, default_value = "127.0.0.1:9000", env = "WEIR_S3_ADDR")]
    pub addr: SocketAddr,
    #[arg(long, default_value = weir_testkit::DEFAULT_ACCESS_KEY, env = "WEIR_S3_ACCESS_KEY")]
    pub access_key: String,
    #[arg(long, default_value = weir_testkit::DEFAULT_SECRET_KEY, env = "WEIR_S3_SECRET_KEY", hide_env_values = true)]
    pub secret_key: String,
    /// Region reported by GetBucketLocation.
    #[arg(long, default_value = weir_testkit::DEFAULT_REGION)]
    pub region: String,
    /// Buckets to create at start (repeatable).
    #[arg(long = "bucket")]
    pub buckets: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ServicesArgs {
    /// Keep the cluster and the S3 data under this folder (default: a temp folder).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Address of the S3 server.
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub s3_addr: SocketAddr,
    /// Bucket created at start.
    #[arg(long, default_value = "weir")]
    pub bucket: String,
}

#[derive(Debug, Args)]
pub struct BackfillArgs {
    #[command(flatten)]
    pub pg: PgArg,
    /// Lake URI: file://path or s3://bucket/prefix (or WEIR_LAKE, or lake in weir.toml).
    #[arg(long, env = "WEIR_LAKE")]
    pub lake: Option<String>,
    /// Only these tables (comma-separated), from the sources file.
    #[arg(long, value_delimiter = ',')]
    pub tables: Option<Vec<String>>,
    /// Parallel COPY workers.
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// Target rows per chunk (default: the table's rows / (2 × jobs), between 1 M and 10 M).
    #[arg(long)]
    pub chunk_rows: Option<u64>,
    /// Rebuild tables that are already landed, as a new table version.
    #[arg(long)]
    pub force: bool,
    /// Parquet file target size in MiB.
    #[arg(long, default_value_t = 128)]
    pub target_file_mb: usize,
    /// The sources file (default: tables/sources.toml when present, else the built-in copy).
    #[arg(long)]
    pub sources: Option<PathBuf>,
    /// Logical replication slot to create for CDC (default: weir_<hash of the lake URL>).
    #[arg(long)]
    pub slot: Option<String>,
    /// Create no replication slot; record the WAL position read before the snapshot.
    #[arg(long, conflicts_with = "slot")]
    pub no_slot: bool,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9184) while running.
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// Accept an S3 bucket outside the EU.
    #[arg(long)]
    pub allow_non_eu: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub pg: PgArg,
    /// Lake URI: file://path or s3://bucket/prefix (or WEIR_LAKE, or lake in weir.toml).
    #[arg(long, env = "WEIR_LAKE")]
    pub lake: Option<String>,
    /// Flight SQL address (port 0 picks a free one and prints it).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Status address: GET /health (JSON) and /metrics (Prometheus).
    #[arg(long, default_value = "127.0.0.1:9185")]
    pub status_addr: String,
    /// How often to look for new changes, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub poll_ms: u64,
    /// Keep only this make's mart fresh (default: every make's).
    #[arg(long)]
    pub make: Option<String>,
    /// Also keep the ML layer fresh after each change: the feature versions and the vector
    /// table (as `weir features` with its defaults).
    #[arg(long)]
    pub features: bool,
    /// The replication slot the backfill created (default: weir_<hash of the lake URL>).
    #[arg(long)]
    pub slot: Option<String>,
    /// Changes per CDC batch (a larger transaction is applied in parts of this many).
    #[arg(long, default_value_t = 200_000)]
    pub batch_changes: u32,
    /// PostgreSQL's logical_decoding_work_mem for the sync's session, e.g. 256MB: a transaction
    /// larger than this is spilled to disk on the source while it is decoded; "server" keeps the
    /// server's setting.
    #[arg(long, default_value = weir_ingest::DEFAULT_DECODING_WORK_MEM)]
    pub decoding_work_mem: String,
    /// Per-query memory limit of the Flight server in MiB (default: serve.memory_limit_mb, else 1024).
    #[arg(long)]
    pub memory_limit_mb: Option<usize>,
    /// How often to vacuum every table in the background (as `weir vacuum`); 0s: never.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub vacuum_every: std::time::Duration,
    /// The vacuum's retention (see `weir vacuum --retain`).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub retain: std::time::Duration,
    /// Accept an S3 bucket outside the EU.
    #[arg(long)]
    pub allow_non_eu: bool,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    #[command(flatten)]
    pub pg: PgArg,
    /// Lake URI: file://path or s3://bucket/prefix (or WEIR_LAKE, or lake in weir.toml).
    #[arg(long, env = "WEIR_LAKE")]
    pub lake: Option<String>,
    /// Keep applying new transactions until interrupted (Ctrl-C / SIGTERM finish the batch in hand).
    #[arg(long)]
    pub follow: bool,
    /// Only these tables (comma-separated), from the sources file.
    #[arg(long, value_delimiter = ',')]
    pub tables: Option<Vec<String>>,
    /// The replication slot (and publication) the backfill created (default: weir_<hash of the lake URL>).
    #[arg(long)]
    pub slot: Option<String>,
    /// Changes per batch: one Delta commit per changed table per batch (a larger transaction
    /// is applied in parts of this many, so memory stays bounded).
    #[arg(long, default_value_t = 200_000)]
    pub batch_changes: u32,
    /// PostgreSQL's logical_decoding_work_mem for the sync's session, e.g. 256MB: a transaction
    /// larger than this is spilled to disk on the source while it is decoded; "server" keeps the
    /// server's setting.
    #[arg(long, default_value = weir_ingest::DEFAULT_DECODING_WORK_MEM)]
    pub decoding_work_mem: String,
    /// With --follow, how often to look for new changes, in milliseconds.
    #[arg(long, default_value_t = 250)]
    pub poll_ms: u64,
    /// The sources file (default: tables/sources.toml when present, else the built-in copy).
    #[arg(long)]
    pub sources: Option<PathBuf>,
    /// Accept an S3 bucket outside the EU.
    #[arg(long)]
    pub allow_non_eu: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("makes").args(["make", "all_makes"])))]
pub struct DeriveArgs {
    /// Lake URI: file://path or s3://bucket/prefix (or WEIR_LAKE, or lake in weir.toml).
    #[arg(long, env = "WEIR_LAKE")]
    pub lake: Option<String>,
    /// Only this job and the jobs it reads from (e.g. listing_price, ads).
    #[arg(long)]
    pub job: Option<String>,
    /// Build the per-make marts of this make only.
    #[arg(long)]
    pub make: Option<String>,
    /// Build the per-make marts of every make (the default).
    #[arg(long)]
    pub all_makes: bool,
    /// The reference instant of the marts (days_online), e.g. 2026-07-01T00:00:00Z
    /// (default: when the newest bronze table was committed).
    #[arg(long)]
    pub as_of: Option<String>,
    /// Rebuild every selected job, changed or not.
    #[arg(long)]
    pub full: bool,
    /// The jobs folder (default: tables/jobs when present, else the built-in copy).
    #[arg(long)]
    pub jobs_dir: Option<PathBuf>,
    /// The sources file (default: tables/sources.toml when present, else the built-in copy).
    #[arg(long)]
    pub sources: Option<PathBuf>,
    /// Parquet file target size in MiB.
    #[arg(long, default_value_t = 128)]
    pub target_file_mb: usize,
    /// Accept an S3 bucket outside the EU.
    #[arg(long)]
    pub allow_non_eu: bool,
}

#[derive(Debug, Args)]
pub struct FeaturesArgs {
    /// Lake URI: file://path or s3://bucket/prefix (or WEIR_LAKE, or lake in weir.toml).
    #[arg(long, env = "WEIR_LAKE")]
    pub lake: Option<String>,
    /// The instant the new feature versions are valid from, e.g. 2026-07-01T00:00:00Z
    /// (default: when the newest bronze table was committed). Never before the last run's.
    #[arg(long)]
    pub as_of: Option<String>,
    /// Recompute the features and rebuild the vector table (refits the embedding, retrains the index).
    #[arg(long)]
    pub full: bool,
    /// Embedding dimension (a multiple of 8, 16 to 1024); changing it rebuilds the vector table.
    #[arg(long, default_value_t = 32)]
    pub dim: usize,
    /// Neighbours the price rating compares a listing's price with.
    #[arg(long, default_value_t = 10)]
    pub rating_k: usize,
    /// The entity jobs folder (default: tables/jobs when present, else the built-in copy).
    #[arg(long)]
    pub jobs_dir: Option<PathBuf>,
    /// The feature jobs folder (default: tables/features when present, else the built-in copy).
    #[arg(long)]
    pub features_dir: Option<PathBuf>,
    /// The sources file (default: tables/sources.toml when present, else the built-in copy).
    #[arg(long)]
    pub sources: Option<PathBuf>,
    /// Accept an S3 bucket outside the EU.
    #[arg(long)]
    pub allow_non_eu: bool,
}

#[derive(Debug, Args)]
pub struct SimilarArgs {
    /// Lake URI: file://path or s3://bucket/prefix (or WEIR_LAKE, or lake in weir.toml).
    #[arg(long, env = "WEIR_LAKE")]
    pub lake: Option<String>,
    /// The listing whose neighbours are wanted.
    #[arg(long)]
    pub listing: i64,
    /// How many neighbours.
    #[arg(short, long, default_value_t = 5)]
    pub k: usize,
    /// A filter on the neighbours, e.g. "country = 'DE' AND is_active".
    #[arg(long)]
    pub filter: Option<String>,
    /// Exact search (a flat scan) instead of the index.
    #[arg(long)]
    pub exact: bool,
    /// Accept an S3 bucket outside the EU.
    #[arg(long)]
    pub allow_non_eu: bool,
}

#[derive(Debug, Args)]
pub struct ParityArgs {
    #[command(flatten)]
    pub pg: PgArg,
    /// Lake URI: file://path or s3://bucket/prefix (or WEIR_LAKE, or lake in weir.toml).
    #[arg(long, env = "WEIR_LAKE")]
    pub lake: Option<String>,
    /// The make whose mart is compared (gold.ads_<slug> against ads_<slug>).
    #[arg(long)]
    pub make: String,
    /// The legacy table in PostgreSQL (default: ads_<slug>).
    #[arg(long)]
    pub legacy_table: Option<String>,
    /// Require both sides to have been built as of this instant.
    #[arg(long)]
    pub as_of: Option<String>,
    /// Differing rows shown per column.
    #[arg(long, default_value_t = 5)]
    pub show: usize,
    /// The jobs folder that defines the mart (default: tables/jobs when present, else the built-in copy).
    #[arg(long)]
    pub jobs_dir: Option<PathBuf>,
    /// Accept an S3 bucket outside the EU.
    #[arg(long)]
    pub allow_non_eu: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Lake URI: file://path or s3://bucket/prefix (or WEIR_LAKE, or lake in weir.toml).
    #[arg(long, env = "WEIR_LAKE")]
    pub lake: Option<String>,
    /// Address to listen on (port 0 picks a free one and prints it).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Per-query memory limit in MiB (default: serve.memory_limit_mb in weir.toml, else 1024).
    #[arg(long)]
    pub memory_limit_mb: Option<usize>,
    /// How often, at most, the table list is re-read (new Delta versions show up after this).
    #[arg(long, default_value_t = 1000)]
    pub refresh_ms: u64,
    /// The jobs folder whose views are served (default: tables/jobs when present, else the built-in copy).
    #[arg(long)]
    pub jobs_dir: Option<PathBuf>,
    /// Accept an S3 bucket outside the EU.
    #[arg(long)]
    pub allow_non_eu: bool,
}

#[derive(Debug, Subcommand)]
pub enum FdwCmd {
    /// Create the extension, server, user mapping, foreign tables and one ads_<slug> view per mart.
    Install(FdwInstallArgs),
    /// Put the legacy tables back where --replace-legacy moved them, dropping the views.
    Rollback(FdwRollbackArgs),
}

#[derive(Debug, Args)]
pub struct FdwInstallArgs {
    #[command(flatten)]
    pub pg: PgArg,
    /// The Flight SQL server (weir serve), e.g. grpc://10.0.0.5:50051.
    #[arg(long)]
    pub flight: String,
    /// Schema for the ads_<slug> views.
    #[arg(long, default_value = "public")]
    pub schema: String,
    /// Flight user (or WEIR_FLIGHT_USER).
    #[arg(long, env = "WEIR_FLIGHT_USER")]
    pub user: Option<String>,
    /// Flight password (or WEIR_FLIGHT_PASSWORD).
    #[arg(long, env = "WEIR_FLIGHT_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// A bearer token instead of user and password (or WEIR_FLIGHT_TOKEN).
    #[arg(long, env = "WEIR_FLIGHT_TOKEN", hide_env_values = true, conflicts_with_all = ["user", "password"])]
    pub token: Option<String>,
    /// Rename existing legacy ads_<slug> tables to ads_<slug>_legacy and put the views in their place.
    #[arg(long)]
    pub replace_legacy: bool,
}

#[derive(Debug, Args)]
pub struct FdwRollbackArgs {
    #[command(flatten)]
    pub pg: PgArg,
    /// Schema of the ads_<slug> views.
    #[arg(long, default_value = "public")]
    pub schema: String,
}
