//! `weir parity`: gold.ads_<slug> in the lake against the legacy ads_<slug> in PostgreSQL.

use anyhow::{Result, bail};
use weir_core::{Config, parse_timestamp};
use weir_derive::ParityOptions;

use crate::cli::ParityArgs;
use crate::settings;

pub async fn run(a: ParityArgs, cfg: &Config) -> Result<()> {
    let url = settings::pg_url(a.pg.pg.as_deref(), cfg)?;
    let lake = settings::open_lake(a.lake.as_deref(), cfg, a.allow_non_eu).await?;
    let expect_as_of = a.as_of.as_deref().map(parse_timestamp).transpose()?.map(|t| t.timestamp_micros());
    let client = weir_postgres::connect(&url).await?;
    let opts = ParityOptions { slug: a.make.clone(), legacy_table: a.legacy_table.clone(), show: a.show, expect_as_of };
    let jobs = super::derive::load_jobs_with_default_sources(a.jobs_dir.as_deref())?;
    let report = weir_derive::parity(&client, &lake, &jobs, &opts).await?;
    println!("{}", report.render());
    if !report.identical() {
        bail!("{} and {} differ (see the report above)", report.legacy_table, report.lake_table);
    }
    Ok(())
}
