use anyhow::{Result, bail};
use weir_core::Config;

use crate::cli::VacuumArgs;

pub async fn run(a: VacuumArgs, cfg: &Config) -> Result<()> {
    let lake = crate::settings::open_lake(a.lake.as_deref(), cfg, a.allow_non_eu).await?;
    if !a.tables.is_empty() {
        let known = weir_lake::delta_tables(&lake).await?;
        if let Some(t) = a.tables.iter().find(|t| !known.contains(&t.trim().replace('.', "/"))) {
            bail!("no Delta table {t} in {} (known: {})", lake.url(), known.join(", "));
        }
    }
    let reports = weir_lake::vacuum_tables(&lake, &a.tables, a.retain, a.dry_run).await?;
    let verb = if a.dry_run { "would delete" } else { "deleted" };
    let (mut files, mut bytes) = (0, 0);
    for r in &reports {
        let n = r.removed_files + r.change_files;
        if n > 0 {
            println!(
                "  {:<28} {verb} {:>6} file(s), {:>9.1} MB ({} removed from the table, {} change data)",
                r.table,
                n,
                r.bytes as f64 / 1e6,
                r.removed_files,
                r.change_files
            );
        }
        files += n;
        bytes += r.bytes;
    }
    // The vector table (Lance) keeps its versions until cleaned up.
    if a.tables.is_empty() && !a.dry_run {
        let c = weir_ml::vectors::cleanup(&lake, a.retain).await?;
        if c.versions > 0 {
            println!(
                "  {:<28} {verb} {:>6} file(s), {:>9.1} MB ({} old versions)",
                weir_ml::vectors::DATASET,
                c.files,
                c.bytes as f64 / 1e6,
                c.versions
            );
        }
        files += c.files;
        bytes += c.bytes;
    }
    println!(
        "vacuum of {} table(s) in {}: {verb} {files} file(s), {:.1} MB (retention {} s)",
        reports.len(),
        lake.url(),
        bytes as f64 / 1e6,
        a.retain.as_secs()
    );
    Ok(())
}
