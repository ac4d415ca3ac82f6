use anyhow::Result;
use weir_testkit::{S3Server, S3ServerConfig};

use crate::cli::S3ServerArgs;

pub async fn run(a: S3ServerArgs) -> Result<()> {
    let config = S3ServerConfig {
        root: a.root,
        addr: a.addr,
        access_key: a.access_key,
        secret_key: a.secret_key,
        region: a.region,
        buckets: a.buckets,
    };
    let server = S3Server::start(config).await?;
    println!(
        "weir s3-server listening on {} (region {}, data in {}); Ctrl-C or SIGTERM stops it",
        server.endpoint(),
        server.config().region,
        server.config().root.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    server.stop().await;
    Ok(())
}
