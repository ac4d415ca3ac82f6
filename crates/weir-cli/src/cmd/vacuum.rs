use anyhow::{Result, bail};
use weir_core::Config;

use crate::cli::VacuumArgs;

/// What [`vacuum_lake`] deleted (or would).
pub(super) struct Vacuumed {
    pub reports: Vec<weir_lake::VacuumReport>,
    /// The vector table's cleanup, when it was part of the vacuum.
    pub vectors: Option<weir_ml::vectors::Cleanup>,
}

impl Vacuumed {
    pub fn files(&self) -> u64 {
        self.reports.iter().map(|r| r.removed_files + r.change_files + r.deletion_vectors).sum::<u64>()
            + self.vectors.map_or(0, |c| c.files)
    }

    pub fn bytes(&self) -> u64 {
        self.reports.iter().map(|r| r.bytes).sum::<u64>() + self.vectors.map_or(0, |c| c.bytes)
    }
}

/// Vacuums `tables` (default: every Delta table, and then the vector table's old versions,
/// which a dry run leaves out).
pub(super) async fn vacuum_lake(
    lake: &weir_lake::Lake,
    tables: &[String],
    retain: std::time::Duration,
    dry_run: bool,
) -> Result<Vacuumed> {
    let reports = weir_lake::vacuum_tables(lake, tables, retain, dry_run).await?;
    let vectors =
        if tables.is_empty() && !dry_run { Some(weir_ml::vectors::cleanup(lake, retain).await?) } else { None };
    Ok(Vacuumed { reports, vectors })
}

pub async fn run(a: VacuumArgs, cfg: &Config) -> Result<()> {
    let lake = crate::settings::open_lake(a.lake.as_deref(), cfg, a.allow_non_eu).await?;
    if !a.tables.is_empty() {
        let known = weir_lake::delta_tables(&lake).await?;
        if let Some(t) = a.tables.iter().find(|t| !known.contains(&t.trim().replace('.', "/"))) {
            bail!("no Delta table {t} in {} (known: {})", lake.url(), known.join(", "));
        }
    }
    let done = vacuum_lake(&lake, &a.tables, a.retain, a.dry_run).await?;
    let verb = if a.dry_run { "would delete" } else { "deleted" };
    for r in done.reports.iter().filter(|r| r.removed_files + r.change_files + r.deletion_vectors > 0) {
        println!(
            "  {:<28} {verb} {:>6} file(s), {:>9.1} MB ({} removed from the table, {} change data, {} deletion vectors)",
            r.table,
            r.removed_files + r.change_files + r.deletion_vectors,
            r.bytes as f64 / 1e6,
            r.removed_files,
            r.change_files,
            r.deletion_vectors
        );
    }
    if let Some(c) = done.vectors.filter(|c| c.versions > 0) {
        println!(
            "  {:<28} {verb} {:>6} file(s), {:>9.1} MB ({} old versions)",
            weir_ml::vectors::DATASET,
            c.files,
            c.bytes as f64 / 1e6,
            c.versions
        );
    }
    println!(
        "vacuum of {} table(s) in {}: {verb} {} file(s), {:.1} MB (retention {} s)",
        done.reports.len(),
        lake.url(),
        done.files(),
        done.bytes() as f64 / 1e6,
        a.retain.as_secs()
    );
    Ok(())
}
