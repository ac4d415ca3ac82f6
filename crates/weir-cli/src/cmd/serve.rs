//! `weir serve`: the Flight SQL server over the lake.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use weir_core::Config;

use crate::cli::ServeArgs;

pub async fn run(a: ServeArgs, cfg: &Config) -> Result<()> {
    let lake = crate::settings::open_lake(a.lake.as_deref(), cfg, a.allow_non_eu).await?;
    let jobs = super::derive::load_jobs_with_default_sources(a.jobs_dir.as_deref())?;
    let (opts, auth, scheme, memory_mb) = flight_options(&a.addr, a.memory_limit_mb, a.refresh_ms, cfg)?;
    let catalog = weir_flight::Catalog::new(lake.clone(), jobs, opts.refresh, opts.memory_limit_bytes);
    let lake_url = lake.url();
    weir_flight::serve(
        catalog,
        auth,
        &opts,
        |bound| {
            println!("weir serve: Flight SQL on {scheme}://{bound} over {lake_url} (memory limit {memory_mb} MiB per query)");
            let _ = std::io::stdout().flush();
        },
        async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            eprintln!("weir serve: stopping");
        },
    )
    .await?;
    Ok(())
}

/// The Flight SQL server's settings from the flags and `[serve]` in weir.toml: options, users,
/// URL scheme, per-query memory limit in MiB.
pub fn flight_options(
    addr: &str,
    memory_limit_mb: Option<usize>,
    refresh_ms: u64,
    cfg: &Config,
) -> Result<(weir_flight::ServeOptions, weir_flight::Auth, &'static str, usize)> {
    let auth = weir_flight::Auth::new(&cfg.serve)?;
    let memory_mb = memory_limit_mb.or(cfg.serve.memory_limit_mb).unwrap_or(1024);
    let tls = match (&cfg.serve.tls_cert, &cfg.serve.tls_key) {
        (Some(c), Some(k)) => Some((
            std::fs::read(c).with_context(|| format!("cannot read serve.tls_cert {c}"))?,
            std::fs::read(k).with_context(|| format!("cannot read serve.tls_key {k}"))?,
        )),
        (None, None) => None,
        _ => bail!("serve.tls_cert and serve.tls_key go together: set both or neither"),
    };
    let scheme = if tls.is_some() { "grpc+tls" } else { "grpc" };
    let opts = weir_flight::ServeOptions {
        addr: addr.to_string(),
        memory_limit_bytes: memory_mb << 20,
        refresh: Duration::from_millis(refresh_ms),
        tls,
    };
    Ok((opts, auth, scheme, memory_mb))
}
