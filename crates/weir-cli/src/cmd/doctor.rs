use anyhow::{Result, bail};
use weir_core::{Config, LakeLocation};
use weir_lake::Lake;

use crate::cli::DoctorArgs;

pub async fn run(a: DoctorArgs, cfg: &Config) -> Result<()> {
    let uri = a.lake.clone().unwrap_or_else(|| cfg.lake_or_default().to_string());
    let cwd = std::env::current_dir()?;
    let lake = Lake::open(LakeLocation::parse(&uri, &cwd)?, &cfg.s3, a.allow_non_eu || cfg.allow_non_eu)?;
    println!("lake {}", lake.url());
    if !report(&lake).await {
        bail!("lake {} failed its checks", lake.url());
    }
    Ok(())
}

/// Runs the checks, prints one line each; true when all passed.
pub async fn report(lake: &Lake) -> bool {
    let checks = weir_lake::run_checks(lake).await;
    for c in &checks {
        println!("  {} {:<36} {} ({} ms)", if c.ok { "✔" } else { "✘" }, c.name, c.detail, c.millis);
    }
    checks.iter().all(|c| c.ok)
}
