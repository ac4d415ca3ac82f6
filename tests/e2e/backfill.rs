//! `weir backfill` against a real PostgreSQL 15 and both lake kinds (a local folder and the
//! in-repo S3 server).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use weir_core::{LakeLocation, S3Settings};
use weir_ingest::{BackfillOptions, Metrics, Outcome, SlotMode, Sources};
use weir_lake::Lake;
use weir_testkit::{S3Server, S3ServerConfig};

use crate::common::{self, scalar_i64};
use crate::lakecheck::{self, pg_rows};

/// A local lake and an S3 lake (the server lives as long as the returned value).
pub async fn lakes() -> (Vec<Lake>, S3Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = S3ServerConfig::local(dir.path().join("s3"));
    cfg.buckets = vec!["lake".into()];
    let server = S3Server::start(cfg).await.unwrap();
    let s3 = s3_settings(&server);
    let local = Lake::open(LakeLocation::Local { root: dir.path().join("local") }, &s3, false).unwrap();
    let remote = Lake::open(LakeLocation::S3 { bucket: "lake".into(), prefix: "weir".into() }, &s3, false).unwrap();
    (vec![local, remote], server, dir)
}

pub fn s3_settings(server: &S3Server) -> S3Settings {
    S3Settings {
        endpoint: Some(server.endpoint()),
        region: Some("eu-central-1".into()),
        access_key_id: Some(weir_testkit::DEFAULT_ACCESS_KEY.into()),
        secret_access_key: Some(weir_testkit::DEFAULT_SECRET_KEY.into()),
        session_token: None,
        allow_http: Some(true),
    }
}

/// Under a concurrent writer, every table equals PostgreSQL at one instant: the writer's
/// transactions land as a prefix of their commit order (no torn transaction, nothing after the
/// snapshot), on both lake kinds. The commit records the slot's LSN; a rerun commits nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_snapshot_under_concurrent_writes() {
    let (lakes, _server, _dir) = lakes().await;
    for (k, lake) in lakes.iter().enumerate() {
        let (_pg, url) = common::marketplace(0.05, 100 + k as u64).await;
        let c = common::client(&url).await;
        let base = scalar_i64(&c, "SELECT max(listing_id) FROM listings").await;
        // Listings the writer updates, with their original mileage.
        let targets: Vec<(i64, Option<i32>)> = c
            .query(
                "SELECT listing_id, mileage_km FROM listings WHERE listing_id > 20 ORDER BY listing_id LIMIT 3000",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicI64::new(0));
        let writer = {
            let (url, stop, done, targets) = (url.clone(), stop.clone(), done.clone(), targets.clone());
            tokio::spawn(async move {
                let c = common::client(&url).await;
                for (i, (target, _)) in targets.iter().enumerate() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let i = i as i64 + 1;
                    // One transaction: a new listing, its first price, and an update elsewhere.
                    c.batch_execute(&format!(
                        "BEGIN;
                         INSERT INTO listings SELECT {id}, country, make_id, model_id, dealer_id, 'writer ' || {i}, fuel, gearbox,
                             first_registration, mileage_km, power_kw, color, zip, NULL, NULL, now(), now(), NULL
                           FROM listings WHERE listing_id = 21;
                         INSERT INTO price_log VALUES ({id}, now(), {i}.50, 'EUR');
                         UPDATE listings SET mileage_km = -{i} WHERE listing_id = {target};
                         COMMIT;",
                        id = base + i
                    ))
                    .await
                    .unwrap();
                    done.store(i, Ordering::Relaxed);
                }
            })
        };
        // Let the writer get going, then back up while it writes.
        while done.load(Ordering::Relaxed) < 20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let opts = BackfillOptions {
            chunk_rows: Some(3_000),
            slot: SlotMode::Slot(format!("weir_test_{k}")),
            ..Default::default()
        };
        let reports =
            weir_ingest::backfill(&url, lake, &common::repo_sources().tables, &opts, Arc::new(Metrics::default()))
                .await
                .unwrap();
        let during = done.load(Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        writer.await.unwrap();
        assert!(reports.iter().all(|r| matches!(r.outcome, Outcome::Committed { version: 0 })), "{reports:?}");

        // The writer's transactions visible in the lake: a prefix 1..=n of the commit order.
        let landed = lakecheck::lake_rows(lake, "bronze/listings", &[("listing_id".into(), "int8".into())]).await;
        let new_ids: Vec<i64> = landed.iter().map(|r| r[0].parse::<i64>().unwrap()).filter(|id| *id > base).collect();
        let n = new_ids.len() as i64;
        assert_eq!(
            new_ids.iter().copied().max().unwrap_or(base),
            base + n,
            "new listings are a prefix of the commit order"
        );
        assert!(n >= 20 && n <= during, "{n} writer transactions in the snapshot; {during} were committed by the end");
        assert!(
            during > n,
            "the writer kept committing during the backfill ({during} vs {n}), or this test proves nothing"
        );

        // Every table equals PostgreSQL with the writer's transactions after n undone.
        let mut expected_listings = pg_rows(&c, "listings", &format!("WHERE listing_id <= {}", base + n)).await;
        let cols = lakecheck::pg_columns(&c, "listings").await;
        let mileage = cols.iter().position(|(n, _)| n == "mileage_km").unwrap();
        for row in &mut expected_listings {
            let id: i64 = row[0].parse().unwrap();
            if let Some(j) = targets.iter().position(|(t, _)| *t == id)
                && j as i64 + 1 > n
            {
                row[mileage] = targets[j].1.map_or(lakecheck::NULL.to_string(), |m| m.to_string());
            }
        }
        expected_listings.sort();
        lakecheck::assert_table_matches(&c, lake, "listings", expected_listings).await;
        let expected_prices = pg_rows(&c, "price_log", &format!("WHERE listing_id <= {}", base + n)).await;
        lakecheck::assert_table_matches(&c, lake, "price_log", expected_prices).await;
        for t in ["makes", "models", "dealers", "fx_rates"] {
            let expected = pg_rows(&c, t, "").await;
            lakecheck::assert_table_matches(&c, lake, t, expected).await;
        }

        // The commit records where CDC starts: the slot's consistent point.
        let slot_lsn: String = c
            .query_one(
                "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&format!("weir_test_{k}")],
            )
            .await
            .unwrap()
            .get(0);
        let table = weir_lake::open_table(lake, "bronze/price_log").await.unwrap();
        let info = weir_lake::last_commit_info(&table, "bronze/price_log").await.unwrap().unwrap();
        let recorded = info["weir.snapshot_lsn"].as_str().unwrap().to_string();
        assert!(reports.iter().all(|r| r.snapshot_lsn == recorded));
        let ahead: bool =
            c.query_one("SELECT $1::text::pg_lsn >= $2::text::pg_lsn", &[&recorded, &slot_lsn]).await.unwrap().get(0);
        assert!(ahead, "recorded LSN {recorded} is before the slot's restart point {slot_lsn}");

        // A rerun commits nothing and says so.
        let again =
            weir_ingest::backfill(&url, lake, &common::repo_sources().tables, &opts, Arc::new(Metrics::default()))
                .await
                .unwrap();
        assert!(again.iter().all(|r| matches!(r.outcome, Outcome::UpToDate { version: 0 })), "{again:?}");
        // --force rebuilds as a new version.
        let forced = BackfillOptions { force: true, ..opts.clone() };
        let rebuilt = weir_ingest::backfill(
            &url,
            lake,
            &common::repo_sources().select(Some(&["makes".into()])).unwrap(),
            &forced,
            Arc::new(Metrics::default()),
        )
        .await
        .unwrap();
        assert!(matches!(rebuilt[0].outcome, Outcome::Committed { version: 1 }), "{rebuilt:?}");
        let expected = pg_rows(&c, "makes", "").await;
        lakecheck::assert_table_matches(&c, lake, "makes", expected).await;
    }
}

/// Every supported type lands exactly, hard values included; an unsupported type stops the
/// run before anything is written, naming table.column and the type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_land_exactly() {
    let (lakes, _server, _dir) = lakes().await;
    let pg = tokio::task::spawn_blocking(weir_testkit::PgCluster::start).await.unwrap().unwrap();
    let url = pg.create_database("types").unwrap();
    let c = common::client(&url).await;
    c.batch_execute(
        r#"CREATE TABLE probe (
             id bigint PRIMARY KEY, i2 smallint, i4 integer, i8 bigint, f4 real, f8 double precision, b boolean,
             n12 numeric(12,2), n38 numeric(38,10), n18 numeric(18,8), t text, v varchar(12), c char(4), d date,
             tz timestamptz, ts timestamp, by bytea, u uuid, jb jsonb, j json);
           INSERT INTO probe VALUES
             (1, -32768, -2147483648, -9223372036854775808, 1.5e-38, -1.7976931348623157e308, true,
              -9999999999.99, -9999999999999999999999999999.9999999999, 0.00000001,
              E'tab\there, newline\nthere, "quotes", back\\slash, emoji 🚗💨, accents ÄÖÜß', 'x', 'ab', '0001-01-01',
              '2025-03-01 23:59:59.999999+00', '1999-12-31 23:59:59.999999', '\x00ff10', '00000000-0000-0000-0000-000000000000',
              '{"b": [1, 2.50, null], "a": "ü"}', '{"keep":  "spacing"}'),
             (2, 32767, 2147483647, 9223372036854775807, 'Infinity', 'NaN', false,
              9999999999.99, 9999999999999999999999999999.9999999999, 1234567890.12345678,
              '', '', '', '9999-12-31', '2025-03-02 00:00:00.000001+00', '2000-01-01 00:00:00', '', 'ffffffff-ffff-ffff-ffff-ffffffffffff',
              '[]', '[]'),
             (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
             (4, 0, 0, 0, -0.0, 0, true, 0, 0, 0, ' ', ' trailing ', 'a b', '1970-01-01', '1970-01-01 00:00:00+00', '1970-01-01 00:00:00',
              '\x', '123e4567-e89b-12d3-a456-426614174000', 'null', 'null');"#,
    )
    .await
    .unwrap();
    let sources = Sources::parse("[[table]]\nname = 'probe'\nkey = ['id']\n", "probe.toml").unwrap();
    for lake in &lakes {
        let reports = weir_ingest::backfill(
            &url,
            lake,
            &sources.tables,
            &BackfillOptions::default(),
            Arc::new(Metrics::default()),
        )
        .await
        .unwrap();
        assert_eq!(reports[0].rows, 4);
        let expected = pg_rows(&c, "probe", "").await;
        lakecheck::assert_table_matches(&c, lake, "probe", expected).await;
    }

    // Arrow types, exactly as the issue lists them.
    let table = weir_lake::open_table(&lakes[0], "bronze/probe").await.unwrap();
    let schema = table.snapshot().unwrap().schema();
    let types: Vec<String> = schema.fields().map(|f| format!("{}:{}", f.name(), f.data_type())).collect();
    for want in [
        "i2:short",
        "i4:integer",
        "i8:long",
        "f4:float",
        "f8:double",
        "b:boolean",
        "n12:decimal(12,2)",
        "n38:decimal(38,10)",
        "t:string",
        "c:string",
        "d:date",
        "tz:timestamp",
        "ts:timestamp_ntz",
        "by:binary",
        "u:string",
        "jb:string",
    ] {
        assert!(types.iter().any(|t| t == want), "{want} not in {types:?}");
    }

    // The landed batches cross the Arrow Flight wire format unchanged (what `weir serve` will
    // send): same schema, same values, for every type.
    {
        use futures::TryStreamExt;
        let ctx = datafusion::prelude::SessionContext::new();
        table.update_datafusion_session(&ctx.state()).unwrap();
        ctx.register_table("probe", table.table_provider().await.unwrap()).unwrap();
        let batches = ctx.sql("SELECT * FROM probe ORDER BY id").await.unwrap().collect().await.unwrap();
        let input = futures::stream::iter(batches.clone().into_iter().map(Ok));
        let encoded = arrow_flight::encode::FlightDataEncoderBuilder::new().build(input);
        let decoded: Vec<_> =
            arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(encoded.map_err(Into::into))
                .try_collect()
                .await
                .unwrap();
        assert_eq!(decoded.len(), batches.len());
        for (a, b) in batches.iter().zip(&decoded) {
            assert_eq!(a.schema().fields(), b.schema().fields());
            assert_eq!(a, b);
        }
        assert_eq!(decoded.iter().map(|b| b.num_rows()).sum::<usize>(), 4);
    }

    // Unsupported types: refused before anything is written.
    for (ddl, needle) in [
        ("CREATE TABLE bad1 (id int PRIMARY KEY, tags text[])", "bad1.tags"),
        ("CREATE TABLE bad2 (id int PRIMARY KEY, amount numeric)", "bad2.amount"),
        ("CREATE TABLE bad3 (id int PRIMARY KEY, at interval)", "bad3.at"),
    ] {
        c.batch_execute(ddl).await.unwrap();
        let name = needle.split('.').next().unwrap();
        let s = Sources::parse(&format!("[[table]]\nname = '{name}'\nkey = ['id']\n"), "bad.toml").unwrap();
        let err = weir_ingest::backfill(
            &url,
            &lakes[0],
            &s.tables,
            &BackfillOptions::default(),
            Arc::new(Metrics::default()),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
        let landed = futures::StreamExt::collect::<Vec<_>>(
            lakes[0].store().list(Some(&lakes[0].path(&format!("bronze/{name}")))),
        )
        .await;
        assert!(landed.is_empty(), "{name}: {landed:?} written despite the error");
    }
}

/// A table held by another backfill is refused with a clear message; the other finishes alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_backfill_of_a_table_is_refused() {
    let (lakes, _server, _dir) = lakes().await;
    let (_pg, url) = common::marketplace(0.01, 3).await;
    let lake = &lakes[1];
    // Hold the lock the way a running backfill does.
    let holder = common::client(&url).await;
    let key = format!("weir.backfill|{}|fx_rates", lake.url());
    holder.query_one("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[&key]).await.unwrap();
    let s = common::repo_sources().select(Some(&["fx_rates".into(), "makes".into()])).unwrap();
    let err = weir_ingest::backfill(&url, lake, &s, &BackfillOptions::default(), Arc::new(Metrics::default()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("fx_rates") && err.to_string().contains("another weir process"), "{err}");
    let table = weir_lake::open_table(lake, "bronze/makes").await.unwrap();
    assert!(table.version().is_none(), "nothing may be committed when a table is busy");
    drop(holder);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Two real processes at once: never two commits of version 0, the table always valid.
    let (a, b) = tokio::join!(
        run_weir(&url, lake, &["--tables", "price_log,listings"]),
        run_weir(&url, lake, &["--tables", "price_log,listings"])
    );
    let oks = [&a, &b].iter().filter(|o| o.status.success()).count();
    assert!(oks >= 1, "{a:?} {b:?}");
    for o in [&a, &b] {
        if !o.status.success() {
            let e = String::from_utf8_lossy(&o.stderr);
            assert!(e.contains("another weir process"), "{e}");
        }
    }
    let c = common::client(&url).await;
    for t in ["price_log", "listings"] {
        let expected = pg_rows(&c, t, "").await;
        lakecheck::assert_table_matches(&c, lake, t, expected).await;
    }
}

async fn run_weir(url: &str, lake: &Lake, extra: &[&str]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(common::weir_bin());
    cmd.args(["backfill", "--pg", url, "--lake", lake.url().as_str(), "--no-slot", "--chunk-rows", "2000"]).args(extra);
    if let LakeLocation::S3 { .. } = lake.location {
        cmd.env("AWS_ENDPOINT_URL", lake.storage_options()["aws_endpoint"].clone())
            .env("AWS_REGION", "eu-central-1")
            .env("AWS_ACCESS_KEY_ID", weir_testkit::DEFAULT_ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", weir_testkit::DEFAULT_SECRET_KEY)
            .env("AWS_ALLOW_HTTP", "true");
    }
    cmd.current_dir(std::env::temp_dir()).output().await.unwrap()
}

/// SIGKILL at random points, several times, then a rerun: finished chunks are not redone and
/// no row is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_resume() {
    let (lakes, _server, dir) = lakes().await;
    let (_pg, url) = common::marketplace(0.3, 8).await;
    let lake = &lakes[0];
    let backfill = |lake: &Lake| {
        let mut c = std::process::Command::new(common::weir_bin());
        c.args(["backfill", "--pg", &url, "--lake", lake.url().as_str(), "--no-slot", "--chunk-rows", "4000"]);
        c
    };
    // How long a whole backfill takes here (into a lake of its own), so the kills land inside
    // one whatever the speed of the machine and the build: fixed windows let a fast build
    // finish before every kill.
    let timing =
        Lake::open(LakeLocation::Local { root: dir.path().join("timing") }, &S3Settings::default(), false).unwrap();
    let clock = std::time::Instant::now();
    let out = backfill(&timing).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let whole = clock.elapsed().as_millis() as u64;
    let root = dir.path().join("local");
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut killed_mid_run = 0;
    for round in 0..3 {
        let before = landed_marks(&root);
        let mut child =
            backfill(lake).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        // Killed once this run has landed something durable (a chunk manifest or a commit),
        // a random moment later: killed before that, the rerun would have nothing to resume.
        let clock = std::time::Instant::now();
        while child.try_wait().unwrap().is_none()
            && clock.elapsed() < Duration::from_millis(3 * whole)
            && landed_marks(&root).is_subset(&before)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let landed = clock.elapsed().as_millis();
        tokio::time::sleep(Duration::from_millis(common::next_random(&mut seed) % (whole / 3).max(1))).await;
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            killed_mid_run += 1;
        }
        let out = child.wait_with_output().unwrap();
        eprintln!(
            "round {round}: first landing after {landed} ms, killed after {} ms (a whole run {whole} ms): {:?}",
            clock.elapsed().as_millis(),
            out.status
        );
    }
    assert!(killed_mid_run > 0, "no run was interrupted; the test proves nothing");
    let out = backfill(lake).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("resumed") || stdout.contains("already landed"), "{stdout}");
    let c = common::client(&url).await;
    for t in ["makes", "models", "dealers", "listings", "price_log", "fx_rates"] {
        let expected = pg_rows(&c, t, "").await;
        lakecheck::assert_table_matches(&c, lake, t, expected).await;
    }
    // Once more: nothing to do.
    let out = std::process::Command::new(common::weir_bin())
        .args(["backfill", "--pg", &url, "--lake", lake.url().as_str(), "--no-slot"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).matches("nothing to do").count() == 6,
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A local lake's chunk manifests and Delta commits: what a backfill has made durable.
fn landed_marks(root: &std::path::Path) -> std::collections::HashSet<std::path::PathBuf> {
    common::files_under(root)
        .into_iter()
        .filter(|path| {
            let s = path.to_string_lossy();
            (s.contains("/_weir/backfill/") && !s.ends_with("/run.json"))
                || (s.contains("/_delta_log/") && s.ends_with(".json"))
        })
        .collect()
}

/// The COPY workers speak the protocol themselves (weir_postgres::RawConnection), so their
/// logins are tested here against what PostgreSQL asks for: a backfill as a SCRAM-SHA-256
/// user lands its tables with PostgreSQL's row counts; md5 and cleartext logins run queries;
/// a wrong or missing password is an error naming the server and never the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_workers_log_in_with_passwords() {
    let (pg, url) = common::marketplace(0.01, 9).await;
    let c = common::client(&url).await;
    let hba = pg.data_dir().join("pg_hba.conf");
    let trusted = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "host all weir_scram 127.0.0.1/32 scram-sha-256\nhost all weir_md5 127.0.0.1/32 md5\n\
             host all weir_plain 127.0.0.1/32 password\n{trusted}"
        ),
    )
    .unwrap();
    c.batch_execute(
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE weir_scram LOGIN PASSWORD 'sc-secret';
         SET password_encryption = 'md5'; CREATE ROLE weir_md5 LOGIN PASSWORD 'md-secret';
         CREATE ROLE weir_plain LOGIN PASSWORD 'pl-secret';
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO weir_scram;
         SELECT pg_reload_conf();",
    )
    .await
    .unwrap();
    let as_user = |user: &str, password: &str| url.replace("postgres@", &format!("{user}:{password}@"));
    // The reload is asynchronous: wait until a wrong password is refused.
    let mut refused = None;
    for _ in 0..100 {
        match weir_postgres::RawConnection::connect(&as_user("weir_scram", "wrong")).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    let refused = refused.expect("pg_hba.conf reloaded");
    assert!(
        refused.contains("password authentication failed") && refused.contains("weir_scram@127.0.0.1"),
        "{refused}"
    );
    assert!(!refused.contains("wrong"), "the password is never shown: {refused}");
    let e =
        weir_postgres::RawConnection::connect(&url.replace("postgres@", "weir_md5@")).await.err().unwrap().to_string();
    assert!(e.contains("asks for a password"), "{e}");
    for (user, password) in [("weir_md5", "md-secret"), ("weir_plain", "pl-secret"), ("weir_scram", "sc-secret")] {
        let mut conn = weir_postgres::RawConnection::connect(&as_user(user, password)).await.unwrap();
        conn.execute("SELECT 1", user).await.unwrap();
        let e = conn.execute("SELECT * FROM no_such_table", "probing").await.unwrap_err().to_string();
        assert!(e.starts_with("probing: relation \"no_such_table\" does not exist"), "{e}");
        conn.execute("SELECT 2", "the connection is usable after an error").await.unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let lake =
        Lake::open(LakeLocation::Local { root: dir.path().to_path_buf() }, &S3Settings::default(), false).unwrap();
    let tables = common::repo_sources().select(Some(&["makes".to_string(), "price_log".to_string()])).unwrap();
    let opts = BackfillOptions { chunk_rows: Some(2_000), slot: SlotMode::NoSlot, ..Default::default() };
    let reports =
        weir_ingest::backfill(&as_user("weir_scram", "sc-secret"), &lake, &tables, &opts, Arc::new(Metrics::default()))
            .await
            .unwrap();
    for r in &reports {
        assert!(matches!(r.outcome, Outcome::Committed { .. }), "{r:?}");
        assert!(r.chunks > 1 || r.table == "makes", "{r:?}");
        assert_eq!(r.rows as i64, scalar_i64(&c, &format!("SELECT count(*) FROM {}", r.table)).await, "{}", r.table);
        lakecheck::assert_table_matches(&c, &lake, &r.table, pg_rows(&c, &r.table, "").await).await;
    }
}

/// A table this process opened before is reopened from its snapshot brought up to date: it
/// follows commits made through other handles, and a table deleted and created again under the
/// same URL (its versions starting over) is read afresh, on both lake kinds. The checkpoints
/// commits are due are written in the background and are there once the process settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopened_tables_follow_commits_and_recreation() {
    use arrow::datatypes::{DataType, Field, Schema};
    use futures::TryStreamExt;
    let (lakes, _server, _dir) = lakes().await;
    let rel = "silver/reopened";
    let schema =
        |cols: &[&str]| Schema::new(cols.iter().map(|c| Field::new(*c, DataType::Int64, true)).collect::<Vec<_>>());
    let columns = |t: &deltalake::DeltaTable| -> Vec<String> {
        t.snapshot().unwrap().snapshot().arrow_schema().fields().iter().map(|f| f.name().clone()).collect()
    };
    let create = |lake: &Lake, cols: &'static [&'static str]| {
        let (lake, schema) = (lake.clone(), schema(cols));
        async move {
            // A handle of its own, as another process would have: not through open_table.
            lake.prepare_table_dir(rel).unwrap();
            let fresh = deltalake::DeltaTable::try_from_url_with_storage_options(
                lake.table_url(rel),
                lake.storage_options().clone(),
            )
            .await
            .unwrap();
            assert!(fresh.version().is_none(), "{rel} is gone");
            weir_lake::commit_files(fresh, rel, &schema, &[], vec![], Default::default(), None, None, None)
                .await
                .unwrap()
                .0
        }
    };
    for lake in &lakes {
        assert_eq!(create(lake, &["a"]).await, 0);
        let t = weir_lake::open_table(lake, rel).await.unwrap();
        assert_eq!((t.version(), columns(&t)), (Some(0), vec!["a".to_string()]));
        // A commit through another handle is seen by the next open.
        let other = weir_lake::open_table(lake, rel).await.unwrap();
        assert_eq!(
            weir_lake::commit_files(other, rel, &schema(&["a"]), &[], vec![], Default::default(), None, None, None)
                .await
                .unwrap()
                .0,
            1
        );
        assert_eq!(weir_lake::open_table(lake, rel).await.unwrap().version(), Some(1));
        // Deleted and created again at version 0 with other columns: not the cached table.
        let store = lake.store();
        let paths: Vec<_> = store.list(Some(&lake.path(rel))).map_ok(|m| m.location).try_collect().await.unwrap();
        for p in paths {
            object_store::ObjectStoreExt::delete(&store, &p).await.unwrap();
        }
        assert_eq!(create(lake, &["b", "c"]).await, 0);
        let t = weir_lake::open_table(lake, rel).await.unwrap();
        assert_eq!((t.version(), columns(&t)), (Some(0), vec!["b".to_string(), "c".to_string()]), "{}", lake.url());

        // The checkpoint due at version 9 (every 10 versions) is written off the commit path;
        // each commit hands back the table at its new version.
        let mut t = t;
        for v in 1..=9 {
            let (version, next) = weir_lake::commit_files(
                t,
                rel,
                &schema(&["b", "c"]),
                &[],
                vec![],
                Default::default(),
                None,
                None,
                None,
            )
            .await
            .unwrap();
            assert_eq!((version, next.version()), (v, Some(v as u64)), "{}", lake.url());
            t = next;
        }
        weir_lake::settle().await;
        let log: Vec<String> = store
            .list(Some(&lake.path(&format!("{rel}/_delta_log"))))
            .map_ok(|m| m.location.filename().unwrap_or_default().to_string())
            .try_collect()
            .await
            .unwrap();
        assert!(log.contains(&"00000000000000000009.checkpoint.parquet".to_string()), "{}: {log:?}", lake.url());
        let fresh = deltalake::DeltaTable::try_from_url_with_storage_options(
            lake.table_url(rel),
            lake.storage_options().clone(),
        )
        .await
        .unwrap();
        assert_eq!((fresh.version(), columns(&fresh)), (Some(9), vec!["b".to_string(), "c".to_string()]));
    }
}
