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

/// The `weir` binary next to this test binary (target/<profile>/weir), or $WEIR_BIN.
pub fn weir_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WEIR_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe.parent().and_then(|d| d.parent()).expect("target/<profile>/deps").join("weir");
    assert!(bin.is_file(), "{} is missing: build it first with `cargo build --bin weir`", bin.display());
    bin
}

pub async fn scalar_i64(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}
