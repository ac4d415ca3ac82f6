//! `weir derive` and `weir parity`: the marts derived in the lake equal the legacy marts for
//! every make, across days of change and a taxonomy change; PostgreSQL-exact expressions
//! against a real PostgreSQL; broken jobs.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;

use chrono::NaiveDate;
use weir_core::{LakeLocation, S3Settings};
use weir_derive::ParityOptions;
use weir_ingest::{BackfillOptions, Metrics, SlotMode, Sources};
use weir_lake::Lake;

use crate::common::{self, weir_bin};

pub(crate) const AS_OF: &str = "2026-07-20T00:00:00Z";

fn local_lake(dir: &std::path::Path) -> Lake {
    Lake::open(LakeLocation::Local { root: dir.to_path_buf() }, &S3Settings::default(), false).unwrap()
}

async fn backfill(url: &str, lake: &Lake, only: Option<&[String]>) {
    let opts = BackfillOptions { force: true, slot: SlotMode::NoSlot, chunk_rows: Some(20_000), ..Default::default() };
    let tables = common::repo_sources().select(only).unwrap();
    weir_ingest::backfill(url, lake, &tables, &opts, Arc::new(Metrics::default())).await.unwrap();
}

/// Runs `weir derive` (the binary, from the repository root so tables/jobs is used).
pub(crate) fn derive(lake_dir: &std::path::Path, extra: &[&str]) -> (bool, String, String) {
    // Every file kept, as `cdc::sync` does: incremental merges write deletion vectors.
    let out = Command::new(weir_bin())
        .current_dir(env!("CARGO_MANIFEST_DIR").to_string() + "/../..")
        .env("WEIR_SMALL_FILE_ROWS", "0")
        .args(["derive", "--lake", &format!("file://{}", lake_dir.display()), "--as-of", AS_OF])
        .args(extra)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Output name → what happened to it ("built", "up to date", "view", "incremental").
pub(crate) fn outcomes(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next()?;
            if !(name.starts_with("silver.") || name.starts_with("gold.")) {
                return None;
            }
            let rest: Vec<&str> = w.collect();
            let what = match *rest.first()? {
                "built" => "built",
                "up" => "up to date",
                "view" => "view",
                "incremental" => "incremental",
                _ => return None,
            };
            Some((name.to_string(), what.to_string()))
        })
        .collect()
}

pub(crate) async fn legacy_all(url: &str) -> Vec<String> {
    let mut c = common::client(url).await;
    let as_of = weir_core::parse_timestamp(AS_OF).unwrap();
    let slugs = weir_synth::list_make_slugs(&c).await.unwrap();
    for s in &slugs {
        weir_synth::build_legacy_mart(&mut c, s, as_of).await.unwrap();
    }
    slugs
}

pub(crate) async fn assert_parity(url: &str, lake: &Lake, slugs: &[String], when: &str) {
    assert_parity_of(url, lake, &common::repo_jobs(), slugs, when).await;
}

/// [`assert_parity`] with the marts as `jobs` declare them.
pub(crate) async fn assert_parity_of(url: &str, lake: &Lake, jobs: &weir_derive::Jobs, slugs: &[String], when: &str) {
    let c = common::client(url).await;
    let as_of = weir_core::parse_timestamp(AS_OF).unwrap().timestamp_micros();
    let mut rows = 0;
    for s in slugs {
        let opts = ParityOptions { slug: s.clone(), legacy_table: None, show: 3, expect_as_of: Some(as_of) };
        let r = weir_derive::parity(&c, lake, jobs, &opts).await.unwrap();
        assert!(r.identical(), "{when}: ads_{s} differs:\n{}", r.render());
        assert_eq!(r.columns.len(), 30);
        rows += r.legacy_rows;
    }
    let total = common::scalar_i64(&c, "SELECT count(*) FROM listings").await;
    if slugs.len() > 1 {
        assert_eq!(rows as i64, total, "{when}: the marts together hold every listing");
    }
}

/// Parity is exact for every make on generated data with the hard cases, after days of
/// change and after a taxonomy change; reruns do nothing; a taxonomy change rebuilds the
/// taxonomy alone: not the folded price log, not the marts' stored rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marts_equal_the_legacy_marts() {
    let (_pg, url) = common::marketplace(0.1, 7).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = local_lake(dir.path());
    backfill(&url, &lake, None).await;
    let slugs = legacy_all(&url).await;
    assert!(slugs.len() >= 10, "{slugs:?}");

    let (ok, out, err) = derive(dir.path(), &[]);
    assert!(ok, "{out}\n{err}");
    let first = outcomes(&out);
    assert_eq!(first.get("silver.listing_price").map(String::as_str), Some("built"), "{out}");
    assert_eq!(first.get("silver.dealer").map(String::as_str), Some("view"), "{out}");
    assert_eq!(first.get("silver.listing").map(String::as_str), Some("view"), "{out}");
    // The folded price log, the taxonomy and every make's stored mart rows in one table.
    assert_eq!(first.get("silver.ads_base").map(String::as_str), Some("built"), "{out}");
    assert_eq!(first.values().filter(|v| *v == "built").count(), 3, "{out}");
    assert_eq!(first.keys().filter(|k| k.starts_with("gold.ads_")).count(), slugs.len(), "{out}");
    assert_parity(&url, &lake, &slugs, "first build").await;

    // Nothing changed: nothing is rebuilt, and it says so.
    let (ok, out, err) = derive(dir.path(), &[]);
    assert!(ok, "{err}");
    assert!(out.contains("nothing changed"), "{out}");
    assert!(!outcomes(&out).values().any(|v| v == "built"), "{out}");

    // Days of change: re-backfill, re-derive, rebuild the legacy marts, compare.
    for (i, day) in [1, 2].iter().enumerate() {
        let date = NaiveDate::from_ymd_opt(2026, 7, *day).unwrap();
        weir_synth::apply_day(&url, &weir_synth::DayOptions { date, seed: 50 + i as u64, taxonomy_rate: 0.0 })
            .await
            .unwrap();
        backfill(&url, &lake, None).await;
        legacy_all(&url).await;
        if i == 1 {
            // One make first: only its partition of the folded price log is rebuilt.
            let (ok, out, err) = derive(dir.path(), &["--make", "vw"]);
            assert!(ok, "{out}\n{err}");
            let o = outcomes(&out);
            assert_eq!(o.get("silver.listing_price").map(String::as_str), Some("built"), "{out}");
            assert!(out.contains("make_id=") && out.contains(" only: "), "a partition rebuild says so:\n{out}");
            assert_eq!(o.keys().filter(|k| k.starts_with("gold.")).count(), 1, "{out}");
            assert_parity(&url, &lake, &["vw".to_string()], &format!("after day {date}, vw alone")).await;
        }
        let (ok, out, err) = derive(dir.path(), &[]);
        assert!(ok, "{out}\n{err}");
        assert_eq!(outcomes(&out).get("silver.listing_price").map(String::as_str), Some("built"), "{out}");
        assert_parity(&url, &lake, &slugs, &format!("after day {date}")).await;
    }

    // A taxonomy change: a model renamed and another moved segment; only models re-landed.
    let c = common::client(&url).await;
    c.batch_execute(
        "UPDATE models SET name = name || ' Neo', updated_at = '2026-07-03 08:00:00+00'
          WHERE model_id = (SELECT model_id FROM listings WHERE listing_id = 21);
         UPDATE models SET segment = CASE WHEN segment = 'suv' THEN 'compact' ELSE 'suv' END,
                updated_at = '2026-07-03 08:00:00+00'
          WHERE model_id = (SELECT max(model_id) FROM models)",
    )
    .await
    .unwrap();
    backfill(&url, &lake, Some(&["models".to_string()])).await;
    legacy_all(&url).await;
    let (ok, out, err) = derive(dir.path(), &[]);
    assert!(ok, "{out}\n{err}");
    let o = outcomes(&out);
    assert_eq!(o.get("silver.model").map(String::as_str), Some("built"), "{out}");
    assert_eq!(o.get("silver.listing_price").map(String::as_str), Some("up to date"), "{out}");
    assert!(out.contains("bronze.models v"), "the reason names the changed input:\n{out}");
    // The marts are views joining the taxonomy at read time: no stored mart row changes.
    assert_eq!(o.values().filter(|v| *v == "built").count(), 1, "{out}");
    assert_eq!(o.get("silver.ads_base").map(String::as_str), Some("up to date"), "{out}");
    assert_parity(&url, &lake, &slugs, "after a taxonomy change").await;

    // A difference is found and shown: break one value in the legacy table.
    c.batch_execute("UPDATE ads_vw SET title = title || '!' WHERE listing_id = (SELECT min(listing_id) FROM ads_vw)")
        .await
        .unwrap();
    let out = Command::new(weir_bin())
        .args(["parity", "--pg", &url, "--lake", &format!("file://{}", dir.path().display()), "--make", "vw"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("title") && stdout.contains("DIFFERENT") && stdout.contains("legacy \""), "{stdout}");
    assert!(stdout.lines().filter(|l| l.contains("identical")).count() == 29, "{stdout}");
}

/// Expressions evaluated by PostgreSQL and by Weir (DataFusion with Weir's functions) over the
/// same rows: generated values plus exact halves and extremes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expressions_match_postgres() {
    let pg = tokio::task::spawn_blocking(weir_testkit::PgCluster::start).await.unwrap().unwrap();
    let url = pg.create_database("golden").unwrap();
    let c = common::client(&url).await;
    c.batch_execute(
        "CREATE TABLE g (id bigint PRIMARY KEY, a numeric(12,2), b numeric(12,2), rate numeric(18,8),
                         kw smallint, d date, t1 timestamptz, t2 timestamptz);
         INSERT INTO g VALUES
           (1, 1.00, 0.99, 0.00500000, 1, '2020-01-01', '2025-01-01 00:00:00+00', '2024-12-31 23:59:59.999999+00'),
           (2, 3.00, 2.97, 0.00500000, 2, '1999-12-31', '2025-01-01 23:59:59.999999+00', '2025-01-01 00:00:00+00'),
           (3, 99999999.99, 0.01, 1.05000000, 32767, '2000-02-29', '2026-07-01 00:00:00+00', '2024-07-01 00:00:00+00'),
           (4, 0.01, 0.02, 9999999999.99999999, -32768, '0001-01-01', '2024-02-29 12:00:00+00', '2024-03-01 00:00:00.000001+00'),
           (5, 8.00, 7.00, 0.04500000, 11, NULL, '2025-05-05 10:00:00+00', NULL),
           (6, 100.00, 87.655, 0.08500000, 37, '2026-06-30', NULL, '2025-05-06 00:00:00+00'),
           (7, 12.34, 12.34, 0.23500000, 0, '1970-01-01', '1970-01-01 00:00:00+00', '1969-12-31 23:59:59.999999+00'),
           (8, 10.00, 100.00, 0.00000001, NULL, '2024-07-01', '2024-07-01 00:00:00+00', '2024-07-01 00:00:00+00'),
           (9, 0.00, 5.00, 1.00000000, 100, '2024-07-01', '2024-07-01 00:00:00+00', '2024-07-01 00:00:00+00'),
           (10, 200.00, 0.01, 0.50000000, 1000, '2024-07-01', '2024-07-01 00:00:00+00', '2024-07-01 00:00:00+00'),
           (11, NULL, 1.00, NULL, 11, '2024-07-01', '2024-07-01 00:00:00+00', '2024-07-01 00:00:00+00'),
           (12, 7.00, 7.01, 0.00166667, 22, '2024-07-01', '2024-07-01 00:00:00+00', '2024-07-01 00:00:00+00');
         SELECT setseed(0.25);
         INSERT INTO g
         SELECT i,
                round((random() * 10 ^ (random() * 8))::numeric, 2),
                round((random() * 10 ^ (random() * 8))::numeric, 2),
                round((random() * 10 ^ (random() * 4 - 2))::numeric, 8),
                (random() * 2000)::int - 1000,
                date '2000-01-01' + (random() * 10000)::int,
                timestamptz '2024-01-01 00:00:00+00' + random() * interval '900 days',
                timestamptz '2024-01-01 00:00:00+00' + random() * interval '900 days'
         FROM generate_series(100, 20099) i;",
    )
    .await
    .unwrap();
    // The same SQL text on both sides where the dialects agree.
    let same = [
        "round(a * rate, 2)",
        "CASE WHEN a > 0 THEN round(100 * (a - b) / a, 2) END",
        "round(kw * 1.35962)",
        "round(a * 1.05, 2)",
        "round(a / 3, 2)",
        "round(b * rate)",
        "a * rate",
        "a - b * 2",
        // Raw division at PostgreSQL's own result scale (≥ 16 significant digits).
        "CASE WHEN b <> 0 THEN a / b END",
        "CASE WHEN rate <> 0 THEN a / rate END",
        "CASE WHEN a <> 0 THEN rate / a END",
    ];
    // (PostgreSQL, Weir) where the spellings differ.
    let pairs = [
        ("extract(year FROM d)::smallint", "CAST(extract(year FROM d) AS SMALLINT)"),
        (
            "(t1 AT TIME ZONE 'UTC')::date - (t2 AT TIME ZONE 'UTC')::date",
            "CAST(CAST(t1 AS DATE) AS INT) - CAST(CAST(t2 AS DATE) AS INT)",
        ),
        ("(t1 AT TIME ZONE 'UTC')::date::text", "CAST(CAST(t1 AS DATE) AS VARCHAR)"),
    ];
    let mut exprs: Vec<(String, String)> = same.iter().map(|e| (e.to_string(), e.to_string())).collect();
    exprs.extend(pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())));

    // The rows reach DataFusion the way every table does: through the backfill.
    let dir = tempfile::tempdir().unwrap();
    let lake = local_lake(dir.path());
    let src = Sources::parse("[[table]]\nname = \"g\"\nkey = [\"id\"]\n", "golden.toml").unwrap();
    let opts = BackfillOptions { slot: SlotMode::NoSlot, ..Default::default() };
    weir_ingest::backfill(&url, &lake, &src.tables, &opts, Arc::new(Metrics::default())).await.unwrap();
    let session = weir_derive::LakeSession::open(&lake, &["g".to_string()]).await.unwrap();

    let norm = |s: Option<String>| -> String {
        match s {
            None => "NULL".into(),
            Some(s) if s.contains('.') && !s.contains('-') || s.contains('.') && s.starts_with('-') => {
                let t = s.trim_end_matches('0').trim_end_matches('.');
                if t == "-0" { "0".into() } else { t.to_string() }
            }
            Some(s) => s,
        }
    };
    let mut compared = 0;
    for (pg_expr, weir_expr) in &exprs {
        let pg_rows: BTreeMap<i64, String> = c
            .query(&format!("SELECT id, ({pg_expr})::text FROM g"), &[])
            .await
            .unwrap_or_else(|e| panic!("{pg_expr}: {e}"))
            .iter()
            .map(|r| (r.get::<_, i64>(0), norm(r.get(1))))
            .collect();
        let batches = session
            .ctx
            .sql(&format!("SELECT id, CAST(({weir_expr}) AS VARCHAR) FROM bronze.g"))
            .await
            .unwrap_or_else(|e| panic!("{weir_expr}: {e}"))
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{weir_expr}: {e}"));
        let mut weir_rows = BTreeMap::new();
        for b in &batches {
            use arrow::array::AsArray;
            let ids = b.column(0).as_primitive::<arrow::datatypes::Int64Type>();
            let vals = arrow::compute::cast(b.column(1), &arrow::datatypes::DataType::Utf8).unwrap();
            let vals = vals.as_string::<i32>();
            for i in 0..b.num_rows() {
                let v = if arrow::array::Array::is_null(vals, i) { None } else { Some(vals.value(i).to_string()) };
                weir_rows.insert(ids.value(i), norm(v));
            }
        }
        assert_eq!(pg_rows.len(), 20_012);
        let diffs: Vec<String> = pg_rows
            .iter()
            .filter(|(id, v)| weir_rows.get(id) != Some(v))
            .take(5)
            .map(|(id, v)| format!("id {id}: postgres {v} weir {:?}", weir_rows.get(id)))
            .collect();
        assert!(diffs.is_empty(), "{pg_expr} | {weir_expr}:\n{}", diffs.join("\n"));
        compared += pg_rows.len();
    }
    assert_eq!(compared, 20_012 * exprs.len());
    // The hand-picked halves came out as PostgreSQL rounds them (half away from zero).
    let half: String = c.query_one("SELECT round(a * rate, 2)::text FROM g WHERE id = 2", &[]).await.unwrap().get(0);
    assert_eq!(half, "0.02");
}

/// A broken job stops `weir derive` before anything is written, naming the file and line;
/// so do a cycle and an unknown source. A drop percentage that does not fit numeric(6,2)
/// fails naming the listing, like the legacy job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_jobs_and_overflow() {
    let (_pg, url) = common::marketplace(0.01, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = local_lake(dir.path());
    backfill(&url, &lake, None).await;
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let jobs = tempfile::tempdir().unwrap();
    for f in ["model.sql", "dealer.sql", "listing.sql", "listing_price.sql", "ads_base.sql", "ads.sql"] {
        std::fs::copy(root.join("tables/jobs").join(f), jobs.path().join(f)).unwrap();
    }
    let run = |extra: &[&str]| {
        let mut args = vec!["--jobs-dir".to_string(), jobs.path().display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        derive(dir.path(), &refs)
    };

    // A column that does not exist, on line 9 of the file.
    let listing = std::fs::read_to_string(jobs.path().join("listing.sql")).unwrap();
    std::fs::write(jobs.path().join("listing.sql"), listing.replace("       gearbox,", "       gearbox_typo,"))
        .unwrap();
    let line = std::fs::read_to_string(jobs.path().join("listing.sql"))
        .unwrap()
        .lines()
        .position(|l| l.contains("gearbox_typo"))
        .unwrap();
    let (ok, out, err) = run(&[]);
    assert!(!ok, "{out}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains(&format!("listing.sql:{}: ", line + 1)) && err.contains("gearbox_typo"), "{err}");
    assert!(err.starts_with("weir: "), "{err}");
    for layer in ["silver", "gold"] {
        let logs = walk(&dir.path().join(layer)).into_iter().filter(|p| p.ends_with("_delta_log")).count();
        assert_eq!(logs, 0, "nothing may be written to {layer}: {out}");
    }
    std::fs::write(jobs.path().join("listing.sql"), &listing).unwrap();

    // A cycle, and an unknown source.
    let model = std::fs::read_to_string(jobs.path().join("model.sql")).unwrap();
    std::fs::write(
        jobs.path().join("model.sql"),
        model.replace("\"bronze.makes\"]", "\"bronze.makes\", \"silver.listing\"]"),
    )
    .unwrap();
    let listing_cycle = listing.replace("[\"bronze.listings\"]", "[\"bronze.listings\", \"silver.model\"]");
    std::fs::write(jobs.path().join("listing.sql"), &listing_cycle).unwrap();
    let (ok, _, err) = run(&[]);
    assert!(
        !ok && err.contains("dependency cycle among jobs") && err.contains("listing") && err.contains("model"),
        "{err}"
    );
    std::fs::write(jobs.path().join("listing.sql"), &listing).unwrap();
    std::fs::write(jobs.path().join("model.sql"), model.replace("\"bronze.makes\"]", "\"bronze.trims\"]")).unwrap();
    let (ok, _, err) = run(&[]);
    assert!(!ok && err.contains("model.sql:") && err.contains("unknown source bronze.trims"), "{err}");
    std::fs::write(jobs.path().join("model.sql"), &model).unwrap();

    // An unknown make and an unknown job.
    let (ok, _, err) = run(&["--make", "trabant"]);
    assert!(!ok && err.contains("\"trabant\""), "{err}");
    let (ok, _, err) = run(&["--job", "nope"]);
    assert!(!ok && err.contains("unknown job \"nope\""), "{err}");

    // The drop percentage overflow: 0.01 → 9,999.99 EUR.
    let c = common::client(&url).await;
    c.batch_execute(
        "DELETE FROM price_log WHERE listing_id = 13;
         INSERT INTO price_log VALUES (13, '2025-03-01 12:00:00+00', 0.01, 'EUR'), (13, '2025-03-02 12:00:00+00', 9999.99, 'EUR');",
    )
    .await
    .unwrap();
    backfill(&url, &lake, Some(&["price_log".to_string()])).await;
    let make: String = c
        .query_one("SELECT mk.slug FROM listings l JOIN makes mk USING (make_id) WHERE listing_id = 13", &[])
        .await
        .unwrap()
        .get(0);
    let (ok, out, err) = run(&["--make", &make]);
    assert!(!ok, "{out}");
    assert!(err.contains("listing_id 13") && err.contains("numeric(6,2)"), "{err}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
            out.push(p);
        }
    }
    out
}
