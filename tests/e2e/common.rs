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

/// The `weir` binary ($WEIR_BIN, or target/<profile>/weir next to this test binary), built
/// once per test run with `cargo build --bin weir` so that it is never stale.
pub fn weir_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("WEIR_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("current exe");
        let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>/deps").to_path_buf();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = std::process::Command::new(cargo);
        build.args(["build", "--quiet", "-p", "weir-cli", "--bin", "weir"]).current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        if std::env::var_os("CARGO_TARGET_DIR").is_none()
            && let Some(target) = profile_dir.parent()
        {
            build.env("CARGO_TARGET_DIR", target);
        }
        let status = build.status().expect("run cargo build --bin weir");
        assert!(status.success(), "cargo build --bin weir failed");
        let bin = profile_dir.join("weir");
        assert!(bin.is_file(), "{} is missing after cargo build", bin.display());
        bin
    })
    .clone()
}

pub async fn scalar_i64(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}
