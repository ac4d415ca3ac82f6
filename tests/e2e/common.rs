use std::path::PathBuf;
use std::sync::Arc;

use weir_synth::{GenerateOptions, NoProgress};
use weir_testkit::PgCluster;

/// A fresh cluster with a database holding a generated marketplace.
pub async fn marketplace(scale: f64, seed: u64) -> (PgCluster, String) {
    let pg = tokio::task::spawn_blocking(PgCluster::start).await.unwrap().expect("start postgres");
    let url = pg.create_database("marketplace").expect("createdb");
    generate(&url, scale, seed).await;
    (pg, url)
}

pub async fn generate(url: &str, scale: f64, seed: u64) {
    let opts = GenerateOptions { scale, seed, replace: false };
    weir_synth::generate(url, &opts, Arc::new(NoProgress)).await.expect("generate");
}

pub async fn client(url: &str) -> tokio_postgres::Client {
    weir_postgres::connect(url).await.expect("connect")
}

/// The `weir` binary cargo built for this test run.
pub fn weir_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_weir"))
}

pub async fn scalar_i64(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

/// (name, pg_type.typname, format_type) of a table's columns, in column order.
pub async fn column_info(c: &tokio_postgres::Client, table: &str) -> Vec<(String, String, String)> {
    c.query(
        "SELECT a.attname::text, t.typname::text, format_type(a.atttypid, a.atttypmod)
         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
         WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        &[&table],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// (column name, format_type) of a table, in column order.
pub async fn column_types(c: &tokio_postgres::Client, table: &str) -> Vec<(String, String)> {
    column_info(c, table).await.into_iter().map(|(n, _, f)| (n, f)).collect()
}

/// The Python with the PyPI tools (deltalake, pyarrow, ADBC), set by ./infra/local/test.sh.
pub fn python() -> String {
    std::env::var("WEIR_PYTHON").unwrap_or_else(|_| {
        panic!("WEIR_PYTHON is not set: run the tests through ./infra/local/test.sh, which installs the Python tools (infra/local/pytools.sh)")
    })
}

/// The repository's source tables (tables/sources.toml).
pub fn repo_sources() -> weir_ingest::Sources {
    weir_ingest::Sources::parse(include_str!("../../tables/sources.toml"), "tables/sources.toml").unwrap()
}

/// The repository's source tables, by name.
pub fn repo_bronze() -> Vec<String> {
    repo_sources().names()
}

/// The repository's jobs (tables/jobs), checked against its sources.
pub fn repo_jobs() -> weir_derive::Jobs {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tables/jobs");
    weir_derive::load_dir(&root, &repo_bronze()).unwrap()
}

/// The next value of a test's pseudo-random sequence: one LCG step of `seed`, its high 31 bits
/// (the kill points of the SIGKILL tests).
pub fn next_random(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    *seed >> 33
}

/// Every file under `dir`, at any depth (none when it does not exist).
pub fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for path in std::fs::read_dir(&d).into_iter().flatten().flatten().map(|e| e.path()) {
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// The active add actions of a Delta table of `lake`.
pub async fn active_files(lake: &weir_lake::Lake, rel: &str) -> Vec<deltalake::kernel::Add> {
    use futures::TryStreamExt;
    let table = weir_lake::open_table(lake, rel).await.unwrap();
    #[allow(deprecated)]
    table.get_active_add_actions_by_partitions(&[]).map_ok(|f| f.add_action()).try_collect().await.unwrap()
}

/// A table's active files by their value of the partition `column`, each as its path and
/// deletion vector: what a merge that leaves a partition alone must not change.
pub async fn files_by_partition(
    lake: &weir_lake::Lake,
    rel: &str,
    column: &str,
) -> std::collections::BTreeMap<Option<String>, std::collections::BTreeSet<String>> {
    let mut by: std::collections::BTreeMap<_, std::collections::BTreeSet<_>> = Default::default();
    for f in active_files(lake, rel).await {
        let value = f.partition_values.get(column).cloned().flatten();
        by.entry(value).or_default().insert(format!("{} {:?}", f.path, f.deletion_vector));
    }
    by
}
