//! `weir sync`: logical-replication CDC into the bronze tables against a real PostgreSQL 15.
//! Every table equals PostgreSQL after days of change, DDL and a truncate; the marts derived
//! from the synced lake equal the legacy marts; SIGKILL at random points loses and doubles
//! nothing, and the slot never passes what the lake holds.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use weir_core::{LakeLocation, S3Settings};
use weir_lake::Lake;
use weir_postgres::pgoutput::parse_lsn;
use weir_testkit::{S3Server, S3ServerConfig};

use crate::common::{self, weir_bin};
use crate::derive::{assert_parity, derive, legacy_all};
use crate::lakecheck::{assert_table_matches, lake_rows, pg_rows};

pub(crate) fn weir(args: &[&str]) -> (bool, String, String) {
    weir_with(args, &[])
}

/// `weir` with `env` set.
fn weir_with(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(weir_bin())
        .current_dir(env!("CARGO_MANIFEST_DIR").to_string() + "/../..")
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// `weir sync` with every file kept (`WEIR_SMALL_FILE_ROWS=0`): at the tests' scale every
/// file is small, and a merge would otherwise fold each into its new files instead of marking
/// the rows it replaces in deletion vectors. `weir run` (below) and the demo keep the default.
pub(crate) fn sync(url: &str, lake: &str, extra: &[&str]) -> String {
    let mut args = vec!["sync", "--pg", url, "--lake", lake];
    args.extend_from_slice(extra);
    let (ok, out, err) = weir_with(&args, &[("WEIR_SMALL_FILE_ROWS", "0")]);
    assert!(ok, "weir sync failed:\n{out}\n{err}");
    out
}

pub(crate) async fn day(url: &str, d: u32, seed: u64, taxonomy_rate: f64) {
    let date = NaiveDate::from_ymd_opt(2026, 7, d).unwrap();
    weir_synth::apply_day(url, &weir_synth::DayOptions { date, seed, taxonomy_rate }).await.unwrap();
}

async fn assert_lake_equals_postgres(url: &str, lake: &Lake, when: &str) {
    let c = common::client(url).await;
    for t in common::repo_bronze() {
        let expected = pg_rows(&c, &t, "").await;
        assert!(!expected.is_empty() || t == "fx_rates", "{when}: {t} is empty");
        assert_table_matches(&c, lake, &t, expected).await;
    }
}

/// What `weir derive` did to silver.listing_price: "built", "incremental", "up".
fn fold_outcome(out: &str) -> String {
    out.lines()
        .find_map(|l| l.trim_start().strip_prefix("silver.listing_price"))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default()
        .to_string()
}

/// A generated marketplace backfilled by `weir backfill` (with its slot) into a local lake.
pub(crate) async fn backfilled(
    scale: f64,
    seed: u64,
) -> (weir_testkit::PgCluster, String, tempfile::TempDir, String, Lake) {
    let (pg, url) = common::marketplace(scale, seed).await;
    let dir = tempfile::tempdir().unwrap();
    let lake_url = format!("file://{}", dir.path().display());
    let lake = local(dir.path());
    let (ok, out, err) = weir(&["backfill", "--pg", &url, "--lake", &lake_url]);
    assert!(ok, "{out}\n{err}");
    (pg, url, dir, lake_url, lake)
}

/// A mart after `merges` incremental updates is still stored for lookups by key: every file
/// sorted by listing_id and of at most one lookup page, and at most one file per update plus
/// one from the build holding any key in its range (what a lookup's file skipping reads).
/// Returns how many of its files carry a deletion vector.
async fn assert_key_ordered(lake: &Lake, root: &std::path::Path, rel: &str, merges: usize) -> usize {
    use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let files = common::active_files(lake, rel).await;
    // By partition (a make's rows): (first, last) key of each file, and every key.
    let mut ranges: std::collections::BTreeMap<String, Vec<(i64, i64)>> = Default::default();
    let mut every_key: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for f in &files {
        let partition = format!("{:?}", f.partition_values.iter().collect::<std::collections::BTreeMap<_, _>>());
        let file = std::fs::File::open(root.join(rel).join(&f.path)).unwrap();
        let mut keys: Vec<i64> = Vec::new();
        for b in ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap() {
            let b = b.unwrap();
            let ids = arrow::compute::cast(b.column_by_name("listing_id").unwrap(), &arrow::datatypes::DataType::Int64)
                .unwrap();
            keys.extend(arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(&ids).iter().flatten());
        }
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{rel}/{} is not in key order", f.path);
        assert!(keys.len() <= weir_derive::incremental::KEY_RANGE_FILE_ROWS, "{rel}/{}: {} rows", f.path, keys.len());
        if let (Some(a), Some(b)) = (keys.first(), keys.last()) {
            ranges.entry(partition.clone()).or_default().push((*a, *b));
        }
        every_key.entry(partition).or_default().extend(keys);
    }
    assert!(!every_key.is_empty(), "{rel} holds rows");
    for (partition, keys) in &every_key {
        let ranges = &ranges[partition];
        let deepest =
            keys.iter().map(|k| ranges.iter().filter(|(lo, hi)| (lo..=hi).contains(&k)).count()).max().unwrap_or(0);
        assert!(
            deepest <= merges + 1,
            "{rel} {partition}: a lookup's file skipping leaves {deepest} files after {merges} updates"
        );
    }
    // Its files carry the key's statistics alone, as the table says: checked in the log's own
    // text (a reader parses only the columns the property names).
    let table = weir_lake::open_table(lake, rel).await.unwrap();
    let config = table.snapshot().unwrap().metadata().configuration().clone();
    assert_eq!(config.get("delta.dataSkippingStatsColumns").map(String::as_str), Some("listing_id"), "{rel}");
    let mut adds = 0;
    for entry in std::fs::read_dir(root.join(rel).join("_delta_log")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let action: serde_json::Value = serde_json::from_str(line).unwrap();
            let Some(stats) = action["add"]["stats"].as_str() else { continue };
            let stats: serde_json::Value = serde_json::from_str(stats).unwrap();
            for of in ["minValues", "maxValues", "nullCount"] {
                let columns: Vec<&String> = stats[of].as_object().unwrap().keys().collect();
                assert_eq!(columns, ["listing_id"], "{rel}: {of} in {}", path.display());
            }
            adds += 1;
        }
    }
    assert!(adds >= files.len(), "{rel}: {adds} adds in the log for {} files", files.len());
    files.iter().filter(|f| f.deletion_vector.is_some()).count()
}

/// The files under each Delta table of a local lake (not its log), relative to the table.
fn files_on_disk(root: &std::path::Path, rel: &str) -> std::collections::BTreeSet<String> {
    let base = root.join(rel);
    assert!(base.is_dir(), "{} is not a table folder", base.display());
    common::files_under(&base)
        .iter()
        .map(|p| p.strip_prefix(&base).unwrap())
        .filter(|p| !p.starts_with("_delta_log"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

/// The number in "`verb` N file(s)" of `weir vacuum`'s summary line.
fn vacuumed(out: &str, verb: &str) -> u64 {
    let line = out.lines().find(|l| l.starts_with("vacuum of ")).unwrap_or_else(|| panic!("no summary: {out}"));
    let rest = line.split(verb).nth(1).unwrap_or_else(|| panic!("{verb:?} not in {line}"));
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// `weir vacuum`: a dry run deletes nothing; a vacuum leaves exactly the files each table
/// holds; a derive whose change feed reaches back before the vacuum rebuilds instead (its
/// files may be gone), and the next one is incremental again, with parity exact.
async fn vacuum_keeps_tables_and_change_feeds(url: &str, root: &std::path::Path, lake_url: &str, lake: &Lake) {
    use futures::TryStreamExt;
    let tables = weir_lake::delta_tables(lake).await.unwrap();
    assert!(
        tables.contains(&"bronze/listings".to_string()) && tables.contains(&"silver/ads_base".to_string()),
        "{tables:?}"
    );
    let before: Vec<_> = tables.iter().map(|t| files_on_disk(root, t)).collect();
    let (ok, out, err) = weir(&["vacuum", "--lake", lake_url, "--retain", "0s", "--dry-run"]);
    assert!(ok, "{out}\n{err}");
    assert!(vacuumed(&out, "would delete") > 0, "merges and rewrites left removed files: {out}");
    let after: Vec<_> = tables.iter().map(|t| files_on_disk(root, t)).collect();
    assert!(before == after, "a dry run deleted files");
    let (ok, out, err) = weir(&["vacuum", "--lake", lake_url, "--tables", "gold.no_such_mart"]);
    assert!(!ok && err.contains("gold.no_such_mart") && err.lines().count() == 1, "{out}\n{err}");
    let (ok, out, err) = weir(&["vacuum", "--lake", lake_url, "--retain", "1y"]);
    assert!(!ok && err.contains("\"1y\"") && err.contains("unit"), "{out}\n{err}");

    // A day synced, then vacuumed before it is derived: the change feed's files are gone.
    day(url, 3, 63, 0.0).await;
    sync(url, lake_url, &[]);
    let (ok, out, err) = weir(&["vacuum", "--lake", lake_url, "--retain", "0s"]);
    assert!(ok, "{out}\n{err}");
    assert!(vacuumed(&out, "deleted") > 0, "{out}");
    for t in &tables {
        let table = weir_lake::open_table(lake, t).await.unwrap();
        let files: Vec<(String, Option<String>)> = table
            .get_active_add_actions_by_partitions(&[])
            .map_ok(|f| {
                (f.path().to_string(), f.deletion_vector_descriptor().and_then(|d| weir_lake::dv::file_name(&d)))
            })
            .try_collect()
            .await
            .unwrap();
        // Its data files and the deletion vectors they read, nothing else.
        let active: std::collections::BTreeSet<String> =
            files.into_iter().flat_map(|(path, dv)| std::iter::once(path).chain(dv)).collect();
        assert_eq!(files_on_disk(root, t), active, "{t}: after a vacuum with no retention, only its files are left");
    }
    let (ok, out, err) = derive(root, &[]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(fold_outcome(&out), "built", "{out}");
    assert!(out.contains("vacuum's horizon"), "the rebuild says why: {out}");

    // Changes after the vacuum are read from the change feed again.
    day(url, 4, 64, 0.0).await;
    sync(url, lake_url, &[]);
    let (ok, out, err) = derive(root, &[]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(fold_outcome(&out), "incremental", "{out}");
    let slugs = legacy_all(url).await;
    assert_parity(url, lake, &slugs, "after vacuums, a rebuild and an incremental derive").await;
}

fn local(dir: &std::path::Path) -> Lake {
    Lake::open(LakeLocation::Local { root: dir.to_path_buf() }, &S3Settings::default(), false).unwrap()
}

/// Days of change (inserts, updates, soft and hard deletes, prices, fx, a taxonomy change),
/// plus what the generator does not do: several changes to one key in one transaction, a key
/// change, ADD COLUMN, a truncate. After `weir sync` in small batches every table equals
/// PostgreSQL, a rerun applies nothing, and the marts derived from the synced lake equal the
/// legacy marts. Other DDL and a missing slot stop with errors that name them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_applies_days_ddl_and_truncates_exactly() {
    let (_pg, url, dir, lake_url, lake) = backfilled(0.05, 31).await;

    let out = sync(&url, &lake_url, &[]);
    assert!(out.contains("nothing new"), "{out}");
    let (ok, out, err) = derive(dir.path(), &[]);
    assert!(ok, "first build: {out}\n{err}");

    day(&url, 1, 61, 1.0).await;
    let c = common::client(&url).await;
    c.batch_execute(
        "BEGIN;
         INSERT INTO listings SELECT 9000001, country, make_id, model_id, dealer_id, 'born and changed', fuel, gearbox,
             first_registration, mileage_km, power_kw, color, zip, price_first, price_last, created_at, now(), NULL
           FROM listings WHERE listing_id = 21;
         UPDATE listings SET mileage_km = 1234, title = 'changed twice' WHERE listing_id = 9000001;
         INSERT INTO listings SELECT 9000002, country, make_id, model_id, dealer_id, 'short-lived', fuel, gearbox,
             first_registration, mileage_km, power_kw, color, zip, price_first, price_last, created_at, now(), NULL
           FROM listings WHERE listing_id = 22;
         DELETE FROM listings WHERE listing_id = 9000002;
         COMMIT;
         UPDATE fx_rates SET day = day + 5000 WHERE (currency, day) = (SELECT currency, max(day) FROM fx_rates GROUP BY currency ORDER BY currency LIMIT 1);
         ALTER TABLE dealers ADD COLUMN rating integer;
         UPDATE dealers SET rating = dealer_id % 5 WHERE dealer_id % 3 = 0;
         CREATE TEMP TABLE fx_keep AS SELECT * FROM fx_rates WHERE day < (SELECT max(day) - 30 FROM fx_rates);
         BEGIN; TRUNCATE fx_rates; INSERT INTO fx_rates SELECT * FROM fx_keep; COMMIT;
         UPDATE listings SET title = (SELECT string_agg(md5(i::text), ' ') FROM generate_series(1, 400) i)
          WHERE listing_id = 23;",
    )
    .await
    .unwrap();
    // Stopped (as by SIGTERM) after the first part of the day's transaction: the sync returns
    // with the tables holding that part and the slot where it stood.
    let slot = weir_ingest::default_slot_name(lake.url().as_str());
    let confirmed = slot_confirmed(&c, &slot).await;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let opts = weir_ingest::SyncOptions { batch_changes: 150, ..weir_ingest::SyncOptions::new(&slot) };
    let report = weir_ingest::sync(&url, &lake, &common::repo_sources().tables, &opts, &stop, |b| {
        if b.inside {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    })
    .await
    .unwrap();
    assert!(report.inside && report.batches == 1, "stopped after the first part: {report:?}");
    assert!(tables_inside_a_transaction(&lake).await > 0, "a table holds the first part");
    assert_eq!(slot_confirmed(&c, &slot).await, confirmed, "the slot stays before the transaction");
    // A derive now warns, naming the tables, that it sees the transaction half applied; the
    // derives after the sync below bring the marts back to the legacy marts (asserted there).
    let (ok, out, err) = derive(dir.path(), &[]);
    assert!(ok, "{out}\n{err}");
    assert!(err.contains("hold part of a transaction") && err.contains("bronze."), "{err}");
    let out = sync(&url, &lake_url, &["--batch-changes", "150"]);
    let batches = out.lines().filter(|l| l.contains(" → ") && l.contains("transactions")).count();
    assert!(batches >= 2, "small batches: {out}");
    // The day is one transaction of more changes than a batch: applied in parts, each
    // recorded with the transaction's commit LSN and its count of changes in.
    assert!(out.contains("inside the transaction"), "the day's transaction applied in parts: {out}");
    assert!(commits_inside_a_transaction(&lake).await > 0, "{out}");
    assert_eq!(tables_inside_a_transaction(&lake).await, 0, "every table's last transaction is whole: {out}");
    assert!(out.contains("truncate"), "{out}");
    assert_lake_equals_postgres(&url, &lake, "after day 1 and the DDL").await;
    let out = sync(&url, &lake_url, &[]);
    assert!(out.contains("nothing new"), "a rerun applies nothing: {out}");
    // The slot's restart point follows it. An advance moves it only to the first
    // running_xacts record past the position confirmed before (PostgreSQL holds one candidate
    // at a time), so after a sync over much WAL it would lag by all of it; the sync then pulls
    // it up to the last such record (a second advance, to where the slot stands). Here: two
    // checkpoints, 30 MB of WAL the publication does not hold, a checkpoint, one sync: the
    // restart point must be past the ballast.
    // (The first checkpoint may only make the decoding consistent, when the slot's restart
    // point holds no serialized snapshot: the second is then the first candidate.)
    c.batch_execute(
        "CHECKPOINT;
         CHECKPOINT;
         CREATE TABLE ballast (g integer, v text) WITH (autovacuum_enabled = off);
         INSERT INTO ballast SELECT g, md5(g::text) FROM generate_series(1, 300000) g;",
    )
    .await
    .unwrap();
    let before: String = c.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap().get(0);
    c.batch_execute("CHECKPOINT").await.unwrap();
    let out = sync(&url, &lake_url, &[]);
    assert!(out.contains("nothing new"), "{out}");
    c.batch_execute("DROP TABLE ballast").await.unwrap();
    let (restart, confirmed): (String, String) = c
        .query_one(
            "SELECT restart_lsn::text, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    let moved: bool = c
        .query_one(
            "SELECT $1::text::pg_lsn >= $3::text::pg_lsn AND $2::text::pg_lsn >= $3::text::pg_lsn",
            &[&restart, &confirmed, &before],
        )
        .await
        .unwrap()
        .get(0);
    assert!(moved, "slot {slot}: restart {restart}, confirmed {confirmed}, the ballast ends at {before}");
    // The backfill again, CDC's commits on top of its own: every table is landed, none is
    // taken for an interrupted run to resume (that would put the snapshot back over day 1).
    let (ok, out, err) = weir(&["backfill", "--pg", &url, "--lake", &lake_url]);
    assert!(ok, "weir backfill after CDC:\n{out}\n{err}");
    let landed = out.lines().filter(|l| l.contains("already landed")).count();
    assert_eq!(landed, common::repo_bronze().len(), "{out}");
    assert_lake_equals_postgres(&url, &lake, "after the backfill ran again").await;
    // A crash between a run's commit and the removal of its state leaves the state behind:
    // the table's log says the run committed.
    let fx = weir_lake::open_table(&lake, "bronze/fx_rates").await.unwrap();
    let run_id = fx
        .history(None)
        .await
        .unwrap()
        .find_map(|c| c.info.get("weir.backfill.run_id").and_then(|v| v.as_str()).map(str::to_string))
        .expect("the backfill's commit names its run");
    let store = weir_ingest::state::StateStore::new(lake.clone());
    let left = weir_ingest::state::RunState {
        run_id,
        table: "fx_rates".into(),
        snapshot_lsn: "0/0".into(),
        started_at: "2026-07-01T00:00:00Z".into(),
        chunk_column: None,
        chunks: vec![weir_ingest::plan::Chunk { id: 0, lo: None, hi: None }],
        expected_rows: 0,
    };
    store.write_run(&left).await.unwrap();
    let (ok, out, err) = weir(&["backfill", "--pg", &url, "--lake", &lake_url, "--tables", "fx_rates"]);
    assert!(ok && out.contains("already landed"), "{out}\n{err}");
    assert!(store.read_run("fx_rates").await.unwrap().is_none(), "the landed run's state is removed");
    // The lake records the database it holds; a backfill or a sync from another is refused
    // before anything is written.
    let recorded = store.recorded_source().await.unwrap().expect("the backfill recorded its source");
    assert_eq!(recorded, weir_ingest::state::SourceIdentity::of(&c).await.unwrap());
    let other = weir_ingest::state::SourceIdentity { system_identifier: "1".into(), ..recorded.clone() };
    let path = lake.path("_weir/source.json");
    let put = |id: &weir_ingest::state::SourceIdentity| {
        let body = object_store::PutPayload::from(serde_json::to_vec(id).unwrap());
        let (store, path) = (lake.store(), path.clone());
        async move { object_store::ObjectStoreExt::put(store.as_ref(), &path, body).await.unwrap() }
    };
    put(&other).await;
    let version = weir_lake::open_table(&lake, "bronze/listings").await.unwrap().version();
    for args in [
        vec!["backfill", "--pg", &url, "--lake", &lake_url, "--force"],
        vec!["sync", "--pg", &url, "--lake", &lake_url],
    ] {
        let (ok, out, err) = weir(&args);
        assert!(!ok, "{args:?} from another source: {out}");
        assert!(err.contains("system identifier 1") && err.contains("use a lake of its own"), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    assert_eq!(weir_lake::open_table(&lake, "bronze/listings").await.unwrap().version(), version, "nothing written");
    put(&recorded).await;
    // A decoding memory PostgreSQL does not take: one line naming it, nothing written.
    let (ok, out, err) = weir(&["sync", "--pg", &url, "--lake", &lake_url, "--decoding-work-mem", "lots"]);
    assert!(!ok, "an invalid --decoding-work-mem: {out}");
    assert!(err.contains("logical_decoding_work_mem") && err.contains("\"lots\""), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert_eq!(weir_lake::open_table(&lake, "bronze/listings").await.unwrap().version(), version, "nothing written");
    let out = sync(&url, &lake_url, &["--decoding-work-mem", "server"]);
    assert!(out.contains("nothing new"), "{out}");
    let (ok, out, err) = derive(dir.path(), &[]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(fold_outcome(&out), "incremental", "the fold is incremental after CDC: {out}");

    // An update that leaves a TOASTed value unsent ('u' in pgoutput): the lake keeps its value.
    let toasted = common::scalar_i64(
        &c,
        "SELECT count(*) FROM pg_class WHERE relname = 'listings' AND pg_relation_size(reltoastrelid) > 0",
    )
    .await;
    assert_eq!(toasted, 1, "the long title is stored out of line");
    // A listing that moves to another make leaves its old make's mart (the incremental marts
    // find it among the affected keys none of their rows holds now).
    c.batch_execute(
        "UPDATE listings SET mileage_km = 7 WHERE listing_id = 23;
         UPDATE listings SET make_id = (SELECT min(make_id) FROM makes WHERE make_id <> listings.make_id)
          WHERE listing_id = 24",
    )
    .await
    .unwrap();
    day(&url, 2, 62, 0.0).await;
    let out = sync(&url, &lake_url, &[]);
    assert!(out.contains("applied"), "{out}");
    assert_lake_equals_postgres(&url, &lake, "after day 2").await;
    // Another reader applies the deletion vectors the merges wrote: Python's deltalake.
    let dvs = files_on_disk(dir.path(), "bronze/listings").iter().filter(|f| f.starts_with("deletion_vector_")).count();
    assert!(dvs >= 2, "each sync's merge into listings marked its replaced rows in a deletion vector file");
    for t in ["listings", "price_log", "dealers"] {
        let uri = lake.table_url(&format!("bronze/{t}")).as_str().trim_end_matches('/').to_string();
        let read = crate::interop::python_reads(std::slice::from_ref(&uri), None);
        let rows = common::scalar_i64(&c, &format!("SELECT count(*) FROM {t}")).await;
        assert_eq!(
            read[&uri]["rows"].as_i64(),
            Some(rows),
            "Python's deltalake reads bronze.{t} as PostgreSQL holds it"
        );
    }

    // The fold brought up to date from the change feeds equals a full rebuild, and the marts
    // from the synced lake equal the legacy marts built from PostgreSQL.
    let (ok, out, err) = derive(dir.path(), &[]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(fold_outcome(&out), "incremental", "{out}");
    assert_eq!(
        crate::derive::outcomes(&out).get("silver.ads_base").map(String::as_str),
        Some("incremental"),
        "marts merged by key: {out}"
    );
    let slugs = legacy_all(&url).await;
    assert_parity(&url, &lake, &slugs, "after two days through CDC and incremental derives").await;
    let marked = assert_key_ordered(&lake, dir.path(), "silver/ads_base", 2).await;
    assert!(marked > 0, "the marts' updates marked replaced rows in deletion vectors, not copied their files");
    let columns: Vec<(String, String)> = [
        "make_id",
        "listing_id",
        "price_first_eur",
        "price_last_eur",
        "price_min_eur",
        "price_max_eur",
        "price_rows",
        "first_price_at",
        "last_price_at",
    ]
    .iter()
    .map(|c| (c.to_string(), String::new()))
    .collect();
    let incremental = lake_rows(&lake, "silver/listing_price", &columns).await;
    let (ok, out, err) = derive(dir.path(), &["--full", "--job", "listing_price"]);
    assert!(ok && fold_outcome(&out) == "built", "{out}\n{err}");
    let full = lake_rows(&lake, "silver/listing_price", &columns).await;
    assert_eq!(incremental.len(), full.len());
    assert!(incremental == full, "the incremental fold differs from a full rebuild");

    vacuum_keeps_tables_and_change_feeds(&url, dir.path(), &lake_url, &lake).await;

    // DDL CDC cannot follow names the table and the column; nothing of it is applied.
    c.batch_execute(
        "ALTER TABLE models DROP COLUMN body_type; UPDATE models SET name = name || '!' WHERE model_id = 1",
    )
    .await
    .unwrap();
    let (ok, out, err) = weir(&["sync", "--pg", &url, "--lake", &lake_url]);
    assert!(!ok, "{out}");
    assert!(err.contains("table models") && err.contains("body_type") && err.lines().count() == 1, "{err}");
    let (ok, _, err) = weir(&["sync", "--pg", &url, "--lake", &lake_url, "--slot", "no_such_slot"]);
    assert!(!ok && err.contains("replication slot no_such_slot does not exist"), "{err}");
}

/// `weir sync` killed with SIGKILL at random points, again and again, then run to the end:
/// every table equals PostgreSQL (nothing lost, nothing doubled: the keys are PostgreSQL's
/// primary keys), and after every kill the slot stands at or before what the lake records (or the lake holds everything).
/// A day is one transaction of more changes than a batch here, so it is applied in parts and
/// most kills land inside one; a last kill is made to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_and_doubles_nothing() {
    let (_pg, url, dir, lake_url, lake) = backfilled(0.05, 32).await;
    for (d, seed) in [(1, 71), (2, 72), (3, 73)] {
        day(&url, d, seed, 0.5).await;
    }
    let c = common::client(&url).await;
    let slot = weir_ingest::default_slot_name(lake.url().as_str());
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    // Runs until four kills have landed (at most twelve runs). A run that catches up before its
    // kill point leaves nothing for the next one, so it is followed by another generated day
    // and a kill window half as long: a faster sync cannot make the test run out of kill points.
    let spawn_sync = |batch: u32| {
        Command::new(weir_bin())
            .args(["sync", "--pg", &url, "--lake", &lake_url, "--batch-changes", &batch.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut kills = 0;
    let mut kills_inside = 0;
    let mut next_day = 4;
    let mut window = 1500;
    let mut seen_whole = 0;
    for _ in 0..12 {
        if kills == 4 {
            break;
        }
        let delay = Duration::from_millis(100 + common::next_random(&mut seed) % window);
        let mut child = spawn_sync(60);
        let started = Instant::now();
        while started.elapsed() < delay {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let caught_up = child.try_wait().unwrap().is_some();
        if !caught_up {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
        // The slot never passes what is committed to the lake.
        let confirmed = slot_confirmed(&c, &slot).await;
        // A day is one transaction of more changes than a batch here: a kill inside it leaves
        // tables holding its first changes.
        if !caught_up && tables_inside_a_transaction(&lake).await > 0 {
            kills_inside += 1;
        }
        let mut newest = 0;
        for t in common::repo_bronze() {
            let rel = format!("bronze/{t}");
            let table = weir_lake::open_table(&lake, &rel).await.unwrap();
            newest = newest.max(weir_ingest::cdc::applied_lsn(&table, &rel).await.unwrap().unwrap());
        }
        // The slot passed every table's last CDC commit only if nothing was left to apply (a
        // slot still where it stood when the lake was last seen whole may trail a later day).
        if confirmed > newest.max(backfill_lsn(&lake).await).max(seen_whole) {
            assert_lake_equals_postgres(&url, &lake, &format!("slot at {confirmed:X} past the lake's {newest:X}"))
                .await;
            seen_whole = confirmed;
        }
        if caught_up {
            day(&url, next_day, 70 + u64::from(next_day), 0.5).await;
            next_day += 1;
            window = (window / 2).max(100);
        }
    }
    eprintln!(
        "sync: {kills} runs killed ({kills_inside} inside a transaction applied in parts), {} caught up before their kill point",
        next_day - 4
    );
    assert!(kills > 0, "no run was killed: the kill points are too late");
    // And a kill certain to land inside a transaction: as soon as a table holds part of one.
    day(&url, next_day, 70 + u64::from(next_day), 0.5).await;
    next_day += 1;
    let confirmed = slot_confirmed(&c, &slot).await;
    let mut child = spawn_sync(20);
    loop {
        if child.try_wait().unwrap().is_some() {
            panic!("weir sync caught up before any table held part of the day's transaction");
        }
        if tables_inside_a_transaction(&lake).await > 0 {
            child.kill().unwrap();
            child.wait().unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(slot_confirmed(&c, &slot).await, confirmed, "the slot moved inside a transaction");
    let out = sync(&url, &lake_url, &[]);
    assert!(out.contains("applied") || out.contains("nothing new"), "{out}");
    assert_lake_equals_postgres(&url, &lake, &format!("after {kills} kills")).await;
    assert_eq!(tables_inside_a_transaction(&lake).await, 0, "every table's log says its last transaction is whole");

    // `weir derive` killed at random points too (first builds, then an incremental run after
    // another day): a final run leaves every mart equal to the legacy mart. Each phase first
    // times a whole derive on a copy of the lake; the kill points fall inside that time (the
    // window halved after each run, as a resumed run has less left), so a derive faster than
    // the test expects is still killed.
    let spawn_derive = |lake_dir: &std::path::Path| {
        Command::new(weir_bin())
            .current_dir(env!("CARGO_MANIFEST_DIR").to_string() + "/../..")
            .args(["derive", "--lake", &format!("file://{}", lake_dir.display()), "--as-of", crate::derive::AS_OF])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let whole_derive = |lake_dir: &std::path::Path| {
        let copy = tempfile::tempdir().unwrap();
        let cp = Command::new("cp").arg("-a").arg(lake_dir.join(".")).arg(copy.path()).status().unwrap();
        assert!(cp.success(), "cp -a {}", lake_dir.display());
        let t = Instant::now();
        assert!(spawn_derive(copy.path()).wait().unwrap().success(), "derive of a copy of the lake failed");
        t.elapsed()
    };
    let mut derive_kills = 0;
    let mut killed_phase = |seed: &mut u64| {
        let mut window = whole_derive(dir.path());
        eprintln!("derive: a whole run took {window:?}");
        for _ in 0..3 {
            let mut child = spawn_derive(dir.path());
            std::thread::sleep(window.mul_f64(0.05 + 0.9 * (common::next_random(seed) % 1000) as f64 / 1000.0));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                derive_kills += 1;
            }
            child.wait().unwrap();
            window /= 2;
        }
    };
    killed_phase(&mut seed);
    let (ok, out, err) = derive(dir.path(), &[]);
    assert!(ok, "{out}\n{err}");
    day(&url, next_day, 70 + u64::from(next_day), 0.0).await;
    sync(&url, &lake_url, &[]);
    killed_phase(&mut seed);
    eprintln!("derive: {derive_kills} of 6 runs killed");
    assert!(derive_kills > 0, "no derive was killed");
    let (ok, out, err) = derive(dir.path(), &[]);
    assert!(ok, "{out}\n{err}");
    let slugs = legacy_all(&url).await;
    assert_parity(&url, &lake, &slugs, &format!("after {derive_kills} killed derives")).await;
}

/// A per-make table job (one table per make, `silver.<job>_<slug>`, read by a per-make view
/// of the same make as `silver.<job>_${slug}`: the marts' layout until session 17, still
/// supported for jobs that declare it) is built, then merged by key after a day through CDC in
/// which a listing moves to another make: the marts equal the legacy marts both times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_make_table_jobs_merge_a_day() {
    let (_pg, url, dir, lake_url, lake) = backfilled(0.02, 43).await;
    let shipped = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tables/jobs");
    let jobs_dir = tempfile::tempdir().unwrap();
    for f in ["model.sql", "dealer.sql", "listing.sql", "listing_price.sql"] {
        std::fs::copy(shipped.join(f), jobs_dir.path().join(f)).unwrap();
    }
    let base = std::fs::read_to_string(shipped.join("ads_base.sql")).unwrap();
    let per_make = base.replace("--! partition = [\"make_id\"]\n", "--! per = \"make\"\n");
    assert_ne!(per_make, base, "ads_base.sql declares its partition");
    let per_make = format!("{}\nWHERE l.make_id = ${{make_id}}\n", per_make.trim_end());
    std::fs::write(jobs_dir.path().join("ads_base.sql"), per_make).unwrap();
    let ads = std::fs::read_to_string(shipped.join("ads.sql")).unwrap();
    let ads_per_make = ads.replace("FROM silver.ads_base a\n", "FROM silver.ads_base_${slug} a\n");
    assert_ne!(ads_per_make, ads, "ads.sql reads silver.ads_base");
    std::fs::write(jobs_dir.path().join("ads.sql"), ads_per_make).unwrap();
    let jobs = weir_derive::load_dir(jobs_dir.path(), &common::repo_bronze()).unwrap();
    let jobs_arg = jobs_dir.path().display().to_string();
    let stored = |out: &str| -> Vec<(String, String)> {
        crate::derive::outcomes(out).into_iter().filter(|(n, _)| n.starts_with("silver.ads_base_")).collect()
    };

    let (ok, out, err) = derive(dir.path(), &["--jobs-dir", &jobs_arg]);
    assert!(ok, "first build: {out}\n{err}");
    let slugs = legacy_all(&url).await;
    let built = stored(&out);
    assert_eq!(built.len(), slugs.len(), "one stored table per make: {out}");
    assert!(built.iter().all(|(_, what)| what == "built"), "{out}");
    assert!(!dir.path().join("silver/ads_base/_delta_log").exists(), "no partitioned table is written");
    crate::derive::assert_parity_of(&url, &lake, &jobs, &slugs, "per-make tables, first build").await;

    let c = common::client(&url).await;
    c.batch_execute(
        "UPDATE listings SET make_id = (SELECT min(make_id) FROM makes WHERE make_id <> listings.make_id)
          WHERE listing_id = 24",
    )
    .await
    .unwrap();
    day(&url, 1, 63, 0.5).await;
    let out = sync(&url, &lake_url, &[]);
    assert!(out.contains("applied"), "{out}");
    let (ok, out, err) = derive(dir.path(), &["--jobs-dir", &jobs_arg]);
    assert!(ok, "after a day: {out}\n{err}");
    let merged = stored(&out);
    assert!(merged.iter().any(|(_, what)| what == "incremental"), "the makes' tables merged by key: {out}");
    assert!(merged.iter().all(|(_, what)| what != "built"), "no make's table rebuilt: {out}");
    let slugs = legacy_all(&url).await;
    crate::derive::assert_parity_of(&url, &lake, &jobs, &slugs, "per-make tables after a day through CDC").await;
}

/// A one-make derive (`--make vw`, as `weir run --make vw` runs it) merges the changed keys
/// into vw's partitions of silver.listing_price (the day's price rows folded, no history
/// read) and silver.ads_base by key instead of rebuilding them: after a day through CDC in
/// which one listing moves into vw and one moves out, ads_vw equals the legacy mart, and no
/// other partition's files are touched. A whole derive after it rebuilds (the partitions
/// no longer share one state) and every mart equals its legacy mart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_make_derive_merges_its_partition() {
    let (_pg, url, dir, lake_url, lake) = backfilled(0.05, 47).await;
    let (ok, out, err) = derive(dir.path(), &[]);
    assert!(ok, "first build: {out}\n{err}");
    let c = common::client(&url).await;
    let vw: i16 = c.query_one("SELECT make_id FROM makes WHERE slug = 'vw'", &[]).await.unwrap().get(0);
    let moves = "UPDATE listings SET make_id = $1 WHERE listing_id = (SELECT min(listing_id) FROM listings WHERE make_id <> $1 AND deleted_at IS NULL);
                 UPDATE listings SET make_id = (SELECT min(make_id) FROM makes WHERE make_id <> $1)
                  WHERE listing_id = (SELECT max(listing_id) FROM listings WHERE make_id = $1 AND deleted_at IS NULL)";
    for sql in moves.split(';') {
        assert_eq!(c.execute(sql, &[&vw]).await.unwrap(), 1, "{sql}");
    }
    day(&url, 1, 64, 0.0).await;
    let out = sync(&url, &lake_url, &[]);
    assert!(out.contains("applied"), "{out}");

    let others = |rel: &'static str| {
        let lake = lake.clone();
        async move {
            let mut by = common::files_by_partition(&lake, rel, "make_id").await;
            by.remove(&Some(vw.to_string()));
            by
        }
    };
    let tables = ["silver/listing_price", "silver/ads_base"];
    let mut before = Vec::new();
    for t in tables {
        before.push(others(t).await);
    }
    let (ok, out, err) = derive(dir.path(), &["--make", "vw"]);
    assert!(ok, "{out}\n{err}");
    let o = crate::derive::outcomes(&out);
    for (t, before) in tables.iter().zip(before) {
        let name = t.replace('/', ".");
        assert_eq!(o.get(&name).map(String::as_str), Some("incremental"), "{out}");
        assert_eq!(others(t).await, before, "{t}: other makes' files: {out}");
    }
    let mut pg = common::client(&url).await;
    let as_of = weir_core::parse_timestamp(crate::derive::AS_OF).unwrap();
    weir_synth::build_legacy_mart(&mut pg, "vw", as_of).await.unwrap();
    assert_parity(&url, &lake, &["vw".to_string()], "vw merged alone").await;

    let (ok, out, err) = derive(dir.path(), &[]);
    assert!(ok, "{out}\n{err}");
    let o = crate::derive::outcomes(&out);
    for t in tables {
        assert_eq!(o.get(&t.replace('/', ".")).map(String::as_str), Some("built"), "{out}");
    }
    let slugs = legacy_all(&url).await;
    assert_parity(&url, &lake, &slugs, "a whole derive after vw alone").await;
}

/// The LSN the backfill recorded (the same for every table).
/// Commits of the bronze tables made inside a transaction larger than a batch.
async fn commits_inside_a_transaction(lake: &Lake) -> usize {
    let mut n = 0;
    for t in common::repo_bronze() {
        let table = weir_lake::open_table(lake, &format!("bronze/{t}")).await.unwrap();
        n += table
            .history(None)
            .await
            .unwrap()
            .filter(|c| c.info.get("weir.cdc.inside_transaction").and_then(|v| v.as_bool()) == Some(true))
            .count();
    }
    n
}

/// The bronze tables whose log says they hold part of a transaction `weir sync` has not
/// finished (the first changes of one larger than a batch).
async fn tables_inside_a_transaction(lake: &Lake) -> usize {
    weir_ingest::cdc::tables_inside_a_transaction(lake, &common::repo_sources().tables).await.unwrap().len()
}

async fn slot_confirmed(c: &tokio_postgres::Client, slot: &str) -> u64 {
    let confirmed: String = c
        .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .unwrap()
        .get(0);
    parse_lsn(&confirmed).unwrap()
}

async fn backfill_lsn(lake: &Lake) -> u64 {
    let table = weir_lake::open_table(lake, "bronze/makes").await.unwrap();
    let mut history = table.history(None).await.unwrap().collect::<Vec<_>>();
    let first = history.pop().unwrap();
    parse_lsn(first.info.get("weir.snapshot_lsn").and_then(|v| v.as_str()).unwrap()).unwrap()
}

async fn health(port: u16) -> serde_json::Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return serde_json::Value::Null };
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or("null")).unwrap_or(serde_json::Value::Null)
}

/// Polls /health until `ok` holds (or panics after a minute).
async fn wait_for(port: u16, what: &str, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let h = health(port).await;
        if ok(&h) {
            return h;
        }
        assert!(t.elapsed() < Duration::from_secs(180), "timed out waiting for {what}: {h}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `weir run` on an S3 lake: applies a day and derives; survives a PostgreSQL restart and an
/// S3-server restart (retries, then applies the next day); vacuums in the background; reports the freshness lag;
/// SIGTERM stops it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_loop_survives_postgres_and_s3_restarts() {
    let (pg, url) = common::marketplace(0.02, 33).await;
    let mut pg = pg;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = S3ServerConfig::local(dir.path().join("s3"));
    cfg.buckets = vec!["lake".into()];
    let server = S3Server::start(cfg).await.unwrap();
    let s3 = crate::backfill::s3_settings(&server);
    let lake = Lake::open(LakeLocation::S3 { bucket: "lake".into(), prefix: "weir".into() }, &s3, false).unwrap();
    let lake_url = "s3://lake/weir";
    let env = [
        ("AWS_ENDPOINT_URL", server.endpoint()),
        ("AWS_REGION", "eu-central-1".to_string()),
        ("AWS_ACCESS_KEY_ID", weir_testkit::DEFAULT_ACCESS_KEY.to_string()),
        ("AWS_SECRET_ACCESS_KEY", weir_testkit::DEFAULT_SECRET_KEY.to_string()),
        ("WEIR_SERVE_TOKEN", "run-test-token".to_string()),
    ];
    let out = Command::new(weir_bin())
        .args(["backfill", "--pg", &url, "--lake", lake_url])
        .envs(env.clone())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let spawn_run = |features: bool| {
        Command::new(weir_bin())
            .current_dir(env!("CARGO_MANIFEST_DIR").to_string() + "/../..")
            .args([
                "run",
                "--pg",
                &url,
                "--lake",
                lake_url,
                "--addr",
                "127.0.0.1:0",
                "--poll-ms",
                "200",
                "--make",
                "vw",
                "--vacuum-every",
                "1s",
                "--retain",
                "5s",
            ])
            .args(features.then_some("--features"))
            .args(["--status-addr", &format!("127.0.0.1:{port}")])
            .envs(env.clone())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = spawn_run(true);
    // The loop's first cycle (at start, nothing synced yet) derives and refreshes the features
    // too: the day's feature run is the one after it.
    let idle = wait_for(port, "the loop's first cycle", |h| h["status"] == "ok" && h["pending"] == false).await;
    let startup_feature_runs = idle["feature_runs"].as_u64().unwrap();

    day(&url, 1, 81, 0.0).await;
    let h = wait_for(port, "the first day", |h| h["derives"].as_u64() >= Some(1)).await;
    assert!(h["changes"].as_u64().unwrap() > 100, "{h}");
    assert!(h["freshness_lag_ms"].as_f64().is_some(), "{h}");
    assert_lake_equals_postgres(&url, &lake, "after the first day under weir run").await;
    assert!(
        weir_lake::open_table(&lake, "silver/ads_base").await.unwrap().version().is_some(),
        "the marts are derived"
    );
    wait_for(port, "the first day's feature run", |h| h["feature_runs"].as_u64() > Some(startup_feature_runs)).await;
    assert_vectors_follow(&url, &lake, "after the first day under weir run --features").await;

    // PostgreSQL goes away and comes back: the loop retries, then carries on.
    let _pg = tokio::task::spawn_blocking(move || {
        pg.stop().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        pg.restart().unwrap();
        pg
    })
    .await
    .unwrap();
    wait_for(port, "a failed iteration during the PostgreSQL restart", |h| h["errors"].as_u64() >= Some(1)).await;
    day(&url, 2, 82, 0.0).await;
    wait_for(port, "the second day", |h| h["derives"].as_u64() >= Some(2) && h["status"] == "ok").await;
    assert_lake_equals_postgres(&url, &lake, "after a PostgreSQL restart under weir run").await;

    // The S3 server goes away (with a day committed meanwhile) and comes back on its port.
    let errors = health(port).await["errors"].as_u64().unwrap();
    let mut config = server.config().clone();
    config.addr = server.addr();
    server.stop().await;
    day(&url, 3, 83, 0.0).await;
    wait_for(port, "a failed iteration during the S3 restart", |h| h["errors"].as_u64() > Some(errors)).await;
    let server = S3Server::start(config).await.unwrap();
    wait_for(port, "the third day", |h| h["derives"].as_u64() >= Some(3) && h["status"] == "ok").await;
    assert_lake_equals_postgres(&url, &lake, "after an S3 restart under weir run").await;
    // The cycle that derived the day also refreshes the features; it ends with nothing pending.
    wait_for(port, "the third day's feature run", |h| {
        h["derives"].as_u64() >= Some(3) && h["pending"] == false && h["status"] == "ok"
    })
    .await;
    assert_vectors_follow(&url, &lake, "after an S3 restart under weir run --features").await;
    // The background vacuum deletes what the merges removed (here from the S3 server).
    wait_for(port, "a vacuum that deletes files", |h| h["vacuumed_files"].as_u64() > Some(0)).await;

    // SIGTERM: the batch in hand finishes, the process exits 0.
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "weir run did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("retrying") && stderr.contains("weir run: stopped"), "{stderr}");

    // SIGKILL as soon as a cycle's sync has committed to the lake (its derive not done, or
    // half done), then a new `weir run`: its first cycle derives what the killed one synced,
    // and ads_vw equals the legacy mart built from PostgreSQL as of the mart's recorded as-of.
    let mut child = spawn_run(false);
    wait_for(port, "the loop after SIGTERM", |h| h["status"] == "ok" && h["pending"] == false).await;
    let synced = || async { weir_lake::open_table(&lake, "bronze/listings").await.unwrap().version() };
    let before = synced().await;
    day(&url, 4, 84, 0.0).await;
    let t = Instant::now();
    while synced().await <= before {
        assert!(t.elapsed() < Duration::from_secs(60), "weir run did not sync day 4");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let mart_version = weir_lake::open_table(&lake, "silver/ads_base").await.unwrap().version();
    let mut child = spawn_run(false);
    wait_for(port, "the derive after the kill", |h| h["status"] == "ok" && h["pending"] == false).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_lake_equals_postgres(&url, &lake, "after a SIGKILL of weir run").await;
    let mart = weir_lake::open_table(&lake, "silver/ads_base").await.unwrap();
    assert!(mart.version() > mart_version, "the restarted loop derived the mart");
    let info = weir_lake::last_commit_info(&mart, "silver/ads_base").await.unwrap().unwrap();
    let mut c = common::client(&url).await;
    // `weir run --make vw` builds vw's partition of the marts' rows alone.
    let vw: i16 = c.query_one("SELECT make_id FROM makes WHERE slug = 'vw'", &[]).await.unwrap().get(0);
    let as_of = weir_derive::run::recorded_as_of(info.get(weir_derive::run::STATE_KEY), Some(i64::from(vw)))
        .expect("the mart's as-of");
    let at = chrono::DateTime::from_timestamp_micros(as_of).unwrap();
    weir_synth::build_legacy_mart(&mut c, "vw", at).await.unwrap();
    let opts = weir_derive::ParityOptions { slug: "vw".into(), legacy_table: None, show: 3, expect_as_of: Some(as_of) };
    let r = weir_derive::parity(&c, &lake, &common::repo_jobs(), &opts).await.unwrap();
    assert!(r.identical(), "after a SIGKILL of weir run and a restart:\n{}", r.render());
    server.stop().await;
}

/// The vector table (Lance, here on the S3 server) holds exactly PostgreSQL's listings.
async fn assert_vectors_follow(url: &str, lake: &Lake, when: &str) {
    use futures::TryStreamExt;
    let ds = weir_ml::vectors::open(lake).await.unwrap().unwrap_or_else(|| panic!("{when}: no vector table"));
    let mut scan = ds.scan();
    scan.project(&["listing_id"]).unwrap();
    let batches: Vec<arrow::array::RecordBatch> = scan.try_into_stream().await.unwrap().try_collect().await.unwrap();
    let mut got: Vec<i64> = batches
        .iter()
        .flat_map(|b| b.column(0).as_any().downcast_ref::<arrow::array::Int64Array>().unwrap().values().to_vec())
        .collect();
    got.sort_unstable();
    let c = common::client(url).await;
    let want: Vec<i64> =
        c.query("SELECT listing_id FROM listings ORDER BY 1", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(got, want, "{when}: the vector table's listings");
}

/// `weir sync --follow` keeps applying until SIGTERM, then exits 0 after the batch in hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_applies_new_days_until_sigterm() {
    let (_pg, url, _dir, lake_url, lake) = backfilled(0.02, 34).await;
    let child = Command::new(weir_bin())
        .args(["sync", "--pg", &url, "--lake", &lake_url, "--follow", "--poll-ms", "100"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let c = common::client(&url).await;
    for d in 1..=2 {
        day(&url, d, 90 + u64::from(d), 0.0).await;
        let expected = common::scalar_i64(&c, "SELECT count(*) FROM price_log").await;
        let t = Instant::now();
        loop {
            let table = weir_lake::open_table(&lake, "bronze/price_log").await.unwrap();
            let applied = weir_ingest::cdc::applied_lsn(&table, "bronze/price_log").await.unwrap().unwrap_or(0);
            let lsn: String = c.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap().get(0);
            if applied > 0 && lakecheck_rows(&lake, expected).await {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "day {d} not applied by --follow (lake at {applied:X}, WAL at {lsn})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_lake_equals_postgres(&url, &lake, "under --follow").await;
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.matches(" → ").count() >= 2 && stdout.contains("applied"), "{stdout}");
}

/// An append-only log synced a few rows at a time (a file per batch) keeps at most
/// `FOLD_APPENDED_FILES` small files in the partition it writes to: the batch that would add
/// one more is merged instead and folds them into its new file. The folded rows are not read
/// as changed: listing_price stays incremental and the marts equal the legacy marts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appended_small_files_are_folded_not_piled_up() {
    use weir_ingest::cdc::FOLD_APPENDED_FILES;
    let (_pg, url, dir, lake_url, lake) = backfilled(0.02, 35).await;
    day(&url, 1, 95, 0.0).await;
    sync(&url, &lake_url, &[]);
    let (ok, out, err) = derive(dir.path(), &[]);
    assert!(ok, "first build: {out}\n{err}");
    let c = common::client(&url).await;
    let ids: Vec<i64> = c
        .query("SELECT DISTINCT listing_id FROM price_log ORDER BY listing_id LIMIT 40", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let syncs = 2 * FOLD_APPENDED_FILES + 2;
    let mut counts = Vec::new();
    for (i, id) in ids.iter().take(syncs).enumerate() {
        // A new price for one listing, after every price day 1 wrote (in July's partition).
        c.execute(
            "INSERT INTO price_log SELECT listing_id, timestamptz '2026-07-01 23:59:59+00' + $2::float8 * interval '1 ms',
                 price, currency FROM price_log WHERE listing_id = $1 ORDER BY changed_at DESC LIMIT 1",
            &[id, &(i as f64)],
        )
        .await
        .unwrap();
        // The default small_file_rows (8192): at this scale every file is small.
        let (ok, out, err) = weir(&["sync", "--pg", &url, "--lake", &lake_url]);
        assert!(ok && out.contains("applied"), "sync {i}: {out}\n{err}");
        counts.push(small_files(&lake, "bronze/price_log", "changed_at_month", "2026-07").await);
        if i % 3 == 2 {
            let (ok, out, err) = derive(dir.path(), &[]);
            assert!(ok, "{out}\n{err}");
            assert_eq!(fold_outcome(&out), "incremental", "after sync {i} (small files {counts:?}): {out}");
        }
    }
    assert!(counts.iter().all(|&n| n <= FOLD_APPENDED_FILES), "small files after each sync: {counts:?}");
    assert!(counts.windows(2).filter(|w| w[1] < w[0]).count() >= 2, "two batches folded the small files: {counts:?}");
    assert_lake_equals_postgres(&url, &lake, "after appends and folds").await;
    let (ok, out, err) = derive(dir.path(), &[]);
    assert!(ok, "{out}\n{err}");
    let slugs = legacy_all(&url).await;
    assert_parity(&url, &lake, &slugs, "after appends and folds").await;
}

/// Active files of `rel` in `column=value` with fewer than 8,192 live rows (the default
/// small_file_rows), from the Delta log's statistics.
async fn small_files(lake: &Lake, rel: &str, column: &str, value: &str) -> usize {
    common::active_files(lake, rel)
        .await
        .iter()
        .filter(|f| f.partition_values.get(column).cloned().flatten().as_deref() == Some(value))
        .filter(|f| {
            let rows = f.get_stats().unwrap().expect("statistics").num_records;
            let deleted = f.deletion_vector.as_ref().map_or(0, |d| d.cardinality);
            rows - deleted < 8192
        })
        .count()
}

/// Whether bronze.price_log holds `rows` rows.
async fn lakecheck_rows(lake: &Lake, rows: i64) -> bool {
    let table = weir_lake::open_table(lake, "bronze/price_log").await.unwrap();
    let ctx = datafusion::prelude::SessionContext::new();
    table.update_datafusion_session(&ctx.state()).unwrap();
    ctx.register_table("t", table.table_provider().await.unwrap()).unwrap();
    let b = ctx.sql("SELECT count(*) FROM t").await.unwrap().collect().await.unwrap();
    let n = b[0].column(0).as_any().downcast_ref::<arrow::array::Int64Array>().unwrap().value(0);
    n == rows
}
