use anyhow::{Result, bail};
use weir_core::Config;
use weir_lake::Lake;

use crate::cli::DoctorArgs;

pub async fn run(a: DoctorArgs, cfg: &Config) -> Result<()> {
    let lake = crate::settings::open_lake(a.lake.as_deref(), cfg, a.allow_non_eu).await?;
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
