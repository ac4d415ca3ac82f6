//! Configuration, read once at the edge: `weir.toml` (or --config) plus the environment.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use weir_core::Config;

pub fn load(explicit: Option<&Path>) -> Result<Config> {
    let (path, required) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from("weir.toml"), false),
    };
    let base = match std::fs::read_to_string(&path) {
        Ok(text) => Config::from_toml(&text, &path.display().to_string())?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Config::default(),
        Err(e) => return Err(e).with_context(|| format!("cannot read config {}", path.display())),
    };
    let env: HashMap<String, String> = std::env::vars().collect();
    Ok(base.with_env(&env)?)
}

/// The PostgreSQL URL from the flag (clap already applied WEIR_PG_URL) or the config.
pub fn pg_url(flag: Option<&str>, cfg: &Config) -> Result<String> {
    match flag.map(str::to_string).or_else(|| cfg.pg_url.clone()) {
        Some(u) if !u.trim().is_empty() => Ok(u),
        _ => bail!("no PostgreSQL URL: pass --pg URL, set WEIR_PG_URL, or set pg_url in weir.toml"),
    }
}

pub fn parse_scale(s: &str) -> Result<f64> {
    let v: f64 =
        s.trim().parse().map_err(|_| anyhow::anyhow!("invalid scale {s:?}: use a number greater than 0, e.g. 0.1"))?;
    weir_synth::generate::listing_count(v)?;
    Ok(v)
}

/// The lake from the flag (clap already applied WEIR_LAKE) or the config, opened; an S3
/// bucket without a configured region is asked for its location.
pub async fn open_lake(flag: Option<&str>, cfg: &Config, allow_non_eu: bool) -> Result<weir_lake::Lake> {
    let uri = flag.unwrap_or_else(|| cfg.lake_or_default());
    let location = weir_core::LakeLocation::parse(uri, &std::env::current_dir()?)?;
    let lake = weir_lake::Lake::open_resolving(location, &cfg.s3, allow_non_eu || cfg.allow_non_eu).await?;
    Ok(match cfg.small_file_rows {
        Some(rows) => lake.with_small_file_rows(rows),
        None => lake,
    })
}
