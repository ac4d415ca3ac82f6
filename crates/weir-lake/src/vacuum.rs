//! Vacuum: deletes the data files a Delta table no longer needs, without a commit.
//!
//! A file is deleted when it was *removed* from the table (a tombstone) longer ago than the
//! retention, or when it is a change-data file (`_change_data/`) written longer ago than twice
//! the retention (at most the retention plus an hour: a change-data file is written before
//! the commit that adds it, so its own age says little about the commit's). Nothing else is touched: a file that was never committed may belong to a
//! backfill that is being resumed, so orphans are left alone.
//!
//! Unlike delta-rs' own vacuum, this writes no VACUUM START/END commits: Weir keeps each
//! table's derivation state in its latest commit and reads change feeds over version ranges,
//! and a commit that changes no data would look like a change to every reader downstream.
//! Instead, the time before which files may be gone is recorded at
//! `_weir/vacuum/<table>.json` *before* anything is deleted; an incremental reader whose range
//! starts before it rebuilds from the current table instead of reading the change feed.

use std::collections::HashSet;

use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as StorePath;
use object_store::{ObjectStoreExt, PutPayload};
use serde_json::{Value, json};

use crate::delta::{DeltaError, delta_err, open_table};
use crate::store::{LAYERS, Lake, LakeStoreError};

/// What a vacuum of one table deleted (or, in a dry run, would delete).
#[derive(Debug, Clone, Default)]
pub struct VacuumReport {
    /// The table, relative to the lake (`gold/ads_vw`).
    pub table: String,
    /// Data files removed from the table before the cutoff.
    pub removed_files: u64,
    /// Change-data files written before the cutoff.
    pub change_files: u64,
    /// Deletion-vector files no version since the cutoff reads.
    pub deletion_vectors: u64,
    pub bytes: u64,
}

/// How much longer than the retention change-data files are kept, at most.
const CHANGE_DATA_SLACK_MS: i64 = 3_600_000;

/// The Delta tables under the lake's layers, as paths relative to the lake (`bronze/listings`).
pub async fn delta_tables(lake: &Lake) -> Result<Vec<String>, DeltaError> {
    let store = lake.store();
    let mut out = Vec::new();
    for layer in LAYERS {
        for name in lake.table_names(layer).await? {
            let rel = format!("{layer}/{name}");
            let log = lake.path(&format!("{rel}/_delta_log"));
            if store.list(Some(&log)).next().await.is_some() {
                out.push(rel);
            }
        }
    }
    Ok(out)
}

fn horizon_path(lake: &Lake, rel: &str) -> StorePath {
    lake.path(&format!("_weir/vacuum/{}.json", rel.trim_matches('/')))
}

/// The instant (milliseconds since the epoch) before which a vacuum may have deleted files
/// of the table at `rel`: a change feed over commits older than this cannot be read.
pub async fn vacuum_horizon(lake: &Lake, rel: &str) -> Result<Option<i64>, DeltaError> {
    let path = horizon_path(lake, rel);
    match lake.store().get(&path).await {
        Ok(r) => {
            let bytes = r.bytes().await.map_err(lake.io_err(format!("reading {path}")))?;
            let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
                DeltaError::Lake(LakeStoreError::Io {
                    url: lake.url().to_string(),
                    what: format!("reading {path}"),
                    message: format!("not JSON: {e}"),
                })
            })?;
            Ok(v.get("cutoff_ms").and_then(Value::as_i64))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(lake.io_err(format!("reading {path}"))(e).into()),
    }
}

/// Vacuums the Delta table at `rel`: deletes what was removed, and the change data written,
/// more than `retain` ago. A dry run only counts. A table that does not exist is not an
/// error (nothing to do).
pub async fn vacuum(
    lake: &Lake,
    rel: &str,
    retain: std::time::Duration,
    dry_run: bool,
) -> Result<VacuumReport, DeltaError> {
    let mut report = VacuumReport { table: rel.to_string(), ..Default::default() };
    let table = open_table(lake, rel).await?;
    if table.version().is_none() {
        return Ok(report);
    }
    let retain_ms = i64::try_from(retain.as_millis()).unwrap_or(i64::MAX);
    let cutoff_ms = Utc::now().timestamp_millis().saturating_sub(retain_ms);
    let change_cutoff_ms = cutoff_ms.saturating_sub(retain_ms.min(CHANGE_DATA_SLACK_MS));
    let active = active_deletion_vectors(&table, rel).await?;
    // delta-rs plans which tombstones expired; its dry run commits nothing.
    let (_, planned) = table
        .vacuum()
        .with_retention_period(chrono::Duration::milliseconds(retain_ms))
        .with_enforce_retention_duration(false)
        .with_dry_run(true)
        .await
        .map_err(delta_err(rel))?;
    let expired: HashSet<String> = planned.files_deleted.into_iter().collect();

    // What is really there (a tombstone stays in the log after its file is gone).
    let store = lake.store();
    let root = lake.path(rel);
    let skip = root.parts().count();
    let mut doomed = Vec::new();
    let mut unread = Vec::new();
    let mut listing = store.list(Some(&root));
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(lake.io_err(format!("listing {rel}")))?;
        let inner: StorePath = meta.location.parts().skip(skip).collect();
        let inner = inner.to_string();
        let change = inner.starts_with("_change_data/") && meta.last_modified.timestamp_millis() < change_cutoff_ms;
        let file_name = inner.rsplit('/').next().unwrap_or_default();
        let deletion_vector = file_name.starts_with("deletion_vector_")
            && file_name.ends_with(".bin")
            && !active.contains(&inner)
            && meta.last_modified.timestamp_millis() < cutoff_ms;
        if change {
            report.change_files += 1;
        } else if deletion_vector {
            unread.push((inner, meta));
            continue;
        } else if expired.contains(&inner) {
            report.removed_files += 1;
        } else {
            continue;
        }
        report.bytes += meta.size;
        doomed.push(meta.location);
    }
    // Deletion vectors no file uses now: gone unless a commit since the cutoff retired them.
    if !unread.is_empty() {
        let names: HashSet<String> = unread.iter().map(|(n, _)| n.clone()).collect();
        let retired = retired_since(lake, rel, cutoff_ms, &names).await?;
        for (_, meta) in unread.into_iter().filter(|(n, _)| !retired.contains(n)) {
            report.deletion_vectors += 1;
            report.bytes += meta.size;
            doomed.push(meta.location);
        }
    }
    if dry_run || doomed.is_empty() {
        return Ok(report);
    }
    // The horizon first: a crash after it deleted nothing yet, which is safe.
    let path = horizon_path(lake, rel);
    let previous = vacuum_horizon(lake, rel).await?.unwrap_or(i64::MIN);
    if cutoff_ms > previous {
        let body = serde_json::to_vec(&json!({ "cutoff_ms": cutoff_ms, "table": rel })).unwrap_or_default();
        store.put(&path, PutPayload::from(body)).await.map_err(lake.io_err(format!("writing {path}")))?;
    }
    delete_all(lake, doomed, rel).await?;
    Ok(report)
}

/// The deletion-vector files of the table's files now (relative to the table).
async fn active_deletion_vectors(table: &deltalake::DeltaTable, rel: &str) -> Result<HashSet<String>, DeltaError> {
    #[allow(deprecated)]
    let dvs: Vec<_> = table
        .get_active_add_actions_by_partitions(&[])
        .map_ok(|f| f.add_action().deletion_vector)
        .try_collect()
        .await
        .map_err(delta_err(rel))?;
    Ok(dvs.iter().flatten().filter_map(crate::dv::file_name).collect())
}

/// Which of `candidates` (deletion-vector files no file uses now) a commit since the cutoff
/// retired: a reader of a version before that commit still reads them. A remove names the
/// deletion vector of the file it retires. Reads the commits since the cutoff only while some
/// candidate is not found yet.
async fn retired_since(
    lake: &Lake,
    rel: &str,
    cutoff_ms: i64,
    candidates: &HashSet<String>,
) -> Result<HashSet<String>, DeltaError> {
    let mut found = HashSet::new();
    let store = lake.store();
    let log = lake.path(&format!("{rel}/_delta_log"));
    let mut listing = store.list(Some(&log));
    while let Some(meta) = listing.next().await {
        if found.len() == candidates.len() {
            break;
        }
        let meta = meta.map_err(lake.io_err(format!("listing {rel}/_delta_log")))?;
        let json = meta.location.filename().is_some_and(|n| n.ends_with(".json") && !n.starts_with('_'));
        if !json || meta.last_modified.timestamp_millis() < cutoff_ms {
            continue;
        }
        let bytes = store
            .get(&meta.location)
            .await
            .map_err(lake.io_err(format!("reading {}", meta.location)))?
            .bytes()
            .await
            .map_err(lake.io_err(format!("reading {}", meta.location)))?;
        for line in bytes.split(|b| *b == b'\n').filter(|l| l.windows(9).any(|w| w == b"\"remove\":")) {
            let Ok(action) = serde_json::from_slice::<Value>(line) else { continue };
            let Some(dv) = action.get("remove").and_then(|r| r.get("deletionVector")) else { continue };
            if let Ok(dv) = serde_json::from_value::<deltalake::kernel::DeletionVectorDescriptor>(dv.clone())
                && let Some(name) = crate::dv::file_name(&dv).filter(|n| candidates.contains(n))
            {
                found.insert(name);
            }
        }
    }
    Ok(found)
}

async fn delete_all(lake: &Lake, paths: Vec<StorePath>, rel: &str) -> Result<(), DeltaError> {
    let locations = futures::stream::iter(paths.into_iter().map(Ok)).boxed();
    lake.store()
        .delete_stream(locations)
        .map(|r| match r {
            Err(object_store::Error::NotFound { path, .. }) => Ok(StorePath::from(path)),
            other => other,
        })
        .try_collect::<Vec<_>>()
        .await
        .map_err(lake.io_err(format!("deleting files of {rel}")))?;
    Ok(())
}

/// Vacuums `tables` (`gold/ads_vw` or `gold.ads_vw`), or every Delta table of the lake when
/// empty, one after the other; stops at the first error.
pub async fn vacuum_tables(
    lake: &Lake,
    tables: &[String],
    retain: std::time::Duration,
    dry_run: bool,
) -> Result<Vec<VacuumReport>, DeltaError> {
    let names = if tables.is_empty() {
        delta_tables(lake).await?
    } else {
        tables.iter().map(|t| t.trim().replace('.', "/")).collect()
    };
    let mut out = Vec::with_capacity(names.len());
    for rel in names {
        out.push(vacuum(lake, &rel, retain, dry_run).await?);
    }
    Ok(out)
}
