//! Subcommand implementations: thin wiring of the library crates.

pub mod backfill;
mod demo;
pub mod derive;
mod doctor;
mod fdw;
pub mod features;
mod generate;
mod legacy;
mod parity;
mod run;
mod s3;
mod serve;
mod services;
pub mod sync;
mod vacuum;

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::cli::{Cli, Command, FdwCmd, LegacyCmd};
use crate::settings;

pub async fn run(cli: Cli) -> Result<()> {
    let cfg = settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Demo(a) => demo::run(a).await,
        Command::Generate(g) => generate::run(g, &cfg).await,
        Command::Backfill(a) => backfill::run(a, &cfg).await,
        Command::Run(a) => run::run(a, &cfg).await,
        Command::Sync(a) => sync::run(a, &cfg).await,
        Command::Derive(a) => derive::run(a, &cfg).await,
        Command::Features(a) => features::run(a, &cfg).await,
        Command::Similar(a) => features::similar(a, &cfg).await,
        Command::Parity(a) => parity::run(a, &cfg).await,
        Command::Serve(a) => serve::run(a, &cfg).await,
        Command::Fdw(FdwCmd::Install(a)) => fdw::install(a, &cfg).await,
        Command::Fdw(FdwCmd::Rollback(a)) => fdw::rollback(a, &cfg).await,
        Command::Legacy(LegacyCmd::Build(a)) => legacy::run(a, &cfg).await,
        Command::Doctor(a) => doctor::run(a, &cfg).await,
        Command::Vacuum(a) => vacuum::run(a, &cfg).await,
        Command::Services(a) => services::run(a).await,
        Command::S3Server(a) => s3::run(a).await,
    }
}

/// `12,345,678`
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

pub fn rate(rows: u64, d: Duration) -> String {
    let s = d.as_secs_f64();
    if s <= 0.0 { "-".into() } else { format!("{}/s", thousands((rows as f64 / s) as u64)) }
}

/// Prints "▸ title", runs the step, prints "  ✔ detail (time)" or the error.
pub async fn step<T>(title: &str, f: impl Future<Output = Result<T>>, detail: impl FnOnce(&T) -> String) -> Result<T> {
    println!("▸ {title}");
    let t = Instant::now();
    let out = f.await?;
    println!("  ✔ {} ({})", detail(&out), secs(t.elapsed()));
    Ok(out)
}
