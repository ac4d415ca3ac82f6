use std::time::Instant;

use anyhow::Result;
use weir_core::{Config, parse_timestamp};

use super::{secs, thousands};
use crate::cli::LegacyBuildArgs;
use crate::settings;

pub async fn run(a: LegacyBuildArgs, cfg: &Config) -> Result<()> {
    let url = settings::pg_url(a.pg.pg.as_deref(), cfg)?;
    let as_of = parse_timestamp(&a.as_of)?;
    if let Some(slug) = &a.make {
        weir_core::validate_slug(slug)?;
    }
    let mut client = weir_postgres::connect(&url).await?;
    let slugs = match a.make {
        Some(s) => vec![s],
        None => weir_synth::list_make_slugs(&client).await?,
    };
    let t = Instant::now();
    let mut total = 0;
    for slug in &slugs {
        let ts = Instant::now();
        let r = weir_synth::build_legacy_mart(&mut client, slug, as_of).await?;
        println!("{:<24} {:>10} rows  {}", r.table, thousands(r.rows), secs(ts.elapsed()));
        total += r.rows;
    }
    if slugs.len() > 1 {
        println!("{} marts, {} rows, {}", slugs.len(), thousands(total), secs(t.elapsed()));
    }
    Ok(())
}
