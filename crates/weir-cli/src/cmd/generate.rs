use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use weir_core::{Config, parse_date};
use weir_synth::{DayOptions, GenerateOptions, GenerateReport};

use super::{rate, secs, thousands};
use crate::cli::{GenerateCmd, GenerateSub};
use crate::progress::Bars;
use crate::settings;

pub async fn run(cmd: GenerateCmd, cfg: &Config) -> Result<()> {
    match cmd.day {
        Some(GenerateSub::Day(a)) => {
            let url = settings::pg_url(a.pg.pg.as_deref(), cfg)?;
            let opts = DayOptions { date: parse_date(&a.date)?, seed: a.seed, taxonomy_rate: a.taxonomy_rate };
            let t = Instant::now();
            let r = weir_synth::apply_day(&url, &opts).await?;
            println!("day {} applied to {} ({}):", opts.date, weir_postgres::describe_url(&url), secs(t.elapsed()));
            println!("  new listings      {}", thousands(r.new_listings));
            println!("  updated           {}", thousands(r.updated));
            println!("  soft-deleted      {}", thousands(r.soft_deleted));
            println!("  hard-deleted      {} {:?}", r.hard_deleted.len(), r.hard_deleted);
            println!("  price rows        {}", thousands(r.price_rows));
            println!("  fx rates          {}", r.fx_rows);
            println!("  dealer updates    {}", r.dealer_updates);
            if r.taxonomy_changes.is_empty() {
                println!("  taxonomy changes  none");
            }
            for c in &r.taxonomy_changes {
                println!("  taxonomy change   {c}");
            }
            Ok(())
        }
        None => {
            let a = cmd.args;
            let url = settings::pg_url(a.pg.pg.as_deref(), cfg)?;
            let scale = settings::parse_scale(&a.scale)?;
            let t = Instant::now();
            let report = generate(&url, scale, a.seed, a.replace).await?;
            print_report(&report, t.elapsed());
            Ok(())
        }
    }
}

pub async fn generate(url: &str, scale: f64, seed: u64, replace: bool) -> Result<GenerateReport> {
    let opts = GenerateOptions { scale, seed, replace };
    Ok(weir_synth::generate(url, &opts, Arc::new(Bars::new())).await?)
}

pub fn print_report(r: &GenerateReport, elapsed: std::time::Duration) {
    let total: u64 = r.tables.iter().map(|(_, n)| n).sum();
    for (t, n) in &r.tables {
        println!("  {t:<10} {:>12} rows", thousands(*n));
    }
    println!(
        "  {} rows in {} ({}; price_log {})",
        thousands(total),
        secs(elapsed),
        rate(total, elapsed),
        rate(r.rows("price_log"), elapsed)
    );
}
