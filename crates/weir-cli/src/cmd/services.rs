//! `weir services`: the local services for development, in the foreground.

use anyhow::{Context, Result};
use weir_testkit::{PgCluster, PgOptions, S3Server, S3ServerConfig};

use crate::cli::ServicesArgs;

pub async fn run(a: ServicesArgs) -> Result<()> {
    if let Some(d) = &a.dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating --dir {}", d.display()))?;
    }
    let opts = PgOptions { parent_dir: a.dir.clone(), ..PgOptions::default() };
    let pg = tokio::task::spawn_blocking(move || PgCluster::start_with(&opts)).await??;
    let db = pg.create_database("marketplace")?;
    let s3_root = match &a.dir {
        Some(d) => d.join("s3"),
        None => std::env::temp_dir().join(format!("weir-s3-{}", std::process::id())),
    };
    let mut cfg = S3ServerConfig::local(&s3_root);
    cfg.addr = a.s3_addr;
    cfg.buckets = vec![a.bucket.clone()];
    let s3 = S3Server::start(cfg).await?;
    println!("PostgreSQL 15 and the S3 server are running; Ctrl-C stops both and removes their data.\n");
    println!("export WEIR_PG_URL={db}");
    println!("export WEIR_LAKE=s3://{}/lake", a.bucket);
    println!("export AWS_ENDPOINT_URL={}", s3.endpoint());
    println!("export AWS_REGION={}", s3.config().region);
    println!("export AWS_ACCESS_KEY_ID={}", s3.config().access_key);
    println!("export AWS_SECRET_ACCESS_KEY={}", s3.config().secret_key);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    s3.stop().await;
    drop(pg);
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&s3_root);
    }
    Ok(())
}
