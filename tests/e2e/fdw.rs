//! The weir_fdw extension inside a real PostgreSQL 15, reading the lake through `weir serve`:
//! the mart equals the legacy table both ways, pushdown is visible and safe next to clauses
//! it cannot translate, LIMIT in joins and count(*), statement_timeout against a stalled
//! server, a wrong password, IMPORT FOREIGN SCHEMA.
//!
//! Needs the extension installed into the system PostgreSQL (./infra/local/fdw.sh, which
//! ./infra/local/test.sh runs).

use std::time::{Duration, Instant};

use crate::common;
use crate::flight::{Served, serve_at, serve_logged, served_vw};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fdw_reads_the_mart_like_the_legacy_table() {
    let Served { _pg, url, dir, c, config, .. } = served_vw(21).await;
    let log = dir.path().join("serve.log");
    let server = serve_logged(&dir.path().join("lake"), &config, &[], Some(&log));

    let columns: Vec<String> = weir_synth::legacy::MART_COLUMNS.iter().map(|(n, t)| format!("{n} {t}")).collect();
    c.batch_execute(&format!(
        "CREATE EXTENSION weir_fdw;
         CREATE SERVER weir FOREIGN DATA WRAPPER weir_fdw OPTIONS (url 'grpc://127.0.0.1:{port}');
         CREATE USER MAPPING FOR CURRENT_USER SERVER weir OPTIONS (user 'analyst', password 's3cret');
         CREATE FOREIGN TABLE lake_ads_vw ({cols}) SERVER weir OPTIONS (table 'gold.ads_vw');",
        port = server.port,
        cols = columns.join(", ")
    ))
    .await
    .unwrap();
    let n = |sql: &'static str| {
        let c = &c;
        async move { common::scalar_i64(c, sql).await }
    };

    // The same rows, both ways, with the legacy column types.
    let legacy = n("SELECT count(*) FROM ads_vw").await;
    assert!(legacy > 100);
    assert_eq!(n("SELECT count(*) FROM lake_ads_vw").await, legacy);
    assert_eq!(n("SELECT count(*) FROM (SELECT * FROM lake_ads_vw EXCEPT ALL SELECT * FROM ads_vw) d").await, 0);
    assert_eq!(n("SELECT count(*) FROM (SELECT * FROM ads_vw EXCEPT ALL SELECT * FROM lake_ads_vw) d").await, 0);
    let scale: String = c
        .query_one("SELECT price_last_eur::text FROM lake_ads_vw WHERE price_last_eur IS NOT NULL LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(scale.split('.').nth(1).map(str::len), Some(2), "numeric keeps its scale: {scale}");
    // The FDW builds numerics from their digits, not their text: the binary form (digits,
    // weight, sign, display scale) equals the legacy table's, value by value, over negative,
    // zero and whole values too.
    let numerics = ["price_first_eur", "price_last_eur", "price_min_eur", "price_max_eur", "price_drop_pct"];
    let differ = numerics
        .iter()
        .map(|c| format!("numeric_send(f.{c}) IS DISTINCT FROM numeric_send(l.{c})"))
        .collect::<Vec<_>>()
        .join(" OR ");
    let sql = format!("SELECT count(*) FROM lake_ads_vw f JOIN ads_vw l USING (listing_id) WHERE {differ}");
    assert_eq!(common::scalar_i64(&c, &sql).await, 0, "{sql}");
    assert!(n("SELECT count(*) FROM ads_vw WHERE price_drop_pct < 0").await > 0);
    assert!(n("SELECT count(*) FROM ads_vw WHERE price_drop_pct = 0").await > 0);
    assert!(n("SELECT count(*) FROM ads_vw WHERE price_last_eur = trunc(price_last_eur, -2)").await > 0);

    // Pushdown: visible in EXPLAIN VERBOSE and in the server's log, results unchanged.
    let plan: Vec<String> = c
        .query(
            "EXPLAIN VERBOSE SELECT listing_id, title FROM lake_ads_vw WHERE listing_id = 21 AND country = 'DE'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("listing_id") && plan.contains("quals"), "{plan}");
    let id = n("SELECT min(listing_id) FROM ads_vw WHERE country = 'DE' AND price_last_eur > 1000").await;
    let row: (String, String) = {
        let r = c
            .query_one(
                "SELECT title, price_last_eur::text FROM lake_ads_vw WHERE listing_id = $1 AND country = 'DE' AND price_last_eur > 1000",
                &[&id],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    let want: (String, String) = {
        let r =
            c.query_one("SELECT title, price_last_eur::text FROM ads_vw WHERE listing_id = $1", &[&id]).await.unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(row, want);
    let server_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        server_log.contains(&format!("\"listing_id\" = {id}")) && server_log.contains("\"price_last_eur\" > 1000"),
        "{server_log}"
    );

    // Prepared statements. Custom plans (the first five runs, or plan_cache_mode =
    // force_custom_plan) work; a cached generic plan cannot run twice under the framework
    // (it frees the scan state with the scan), and that is a clear error, not a crash.
    let stmt = c.prepare("SELECT title FROM lake_ads_vw WHERE listing_id = $1").await.unwrap();
    let mut refused = None;
    for i in 0..8 {
        match c.query(&stmt, &[&id]).await {
            Ok(rows) => {
                assert_eq!(rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>(), vec![want.0.clone()])
            }
            Err(e) => {
                refused = Some((i, weir_postgres::conn::db_message(&e)));
                break;
            }
        }
    }
    let (run, msg) = refused.expect("the generic plan's second run is refused");
    assert!(run >= 5 && msg.contains("cached query plan") && msg.contains("force_custom_plan"), "run {run}: {msg}");
    assert_eq!(
        n("SELECT count(*) FROM lake_ads_vw WHERE listing_id = 21").await,
        n("SELECT count(*) FROM ads_vw WHERE listing_id = 21").await,
        "the backend lives on"
    );
    c.batch_execute("SET plan_cache_mode = force_custom_plan").await.unwrap();
    let stmt = c.prepare("SELECT title FROM lake_ads_vw WHERE listing_id = $1").await.unwrap();
    for _ in 0..8 {
        let rows = c.query(&stmt, &[&id]).await.unwrap();
        assert_eq!(rows[0].get::<_, String>(0), want.0);
    }
    c.batch_execute("RESET plan_cache_mode").await.unwrap();

    // Untranslatable clause + LIMIT, a join with LIMIT, IN, IS NULL, LIKE: PostgreSQL's answers.
    for (lake_sql, legacy_sql) in [
        (
            "SELECT count(*) FROM (SELECT * FROM lake_ads_vw WHERE lower(country) = 'de' LIMIT 5) x",
            "SELECT count(*) FROM (SELECT * FROM ads_vw WHERE lower(country) = 'de' LIMIT 5) x",
        ),
        (
            "SELECT count(*) FROM (SELECT a.listing_id FROM lake_ads_vw a JOIN ads_vw b USING (listing_id) WHERE b.is_active LIMIT 7) x",
            "SELECT count(*) FROM (SELECT a.listing_id FROM ads_vw a JOIN ads_vw b USING (listing_id) WHERE b.is_active LIMIT 7) x",
        ),
        (
            "SELECT count(*) FROM lake_ads_vw WHERE country IN ('DE', 'AT') OR deleted_at IS NULL",
            "SELECT count(*) FROM ads_vw WHERE country IN ('DE', 'AT') OR deleted_at IS NULL",
        ),
        (
            "SELECT count(*) FROM lake_ads_vw WHERE title LIKE '%a%' AND zip IS NULL",
            "SELECT count(*) FROM ads_vw WHERE title LIKE '%a%' AND zip IS NULL",
        ),
        (
            "SELECT count(*) FROM lake_ads_vw WHERE last_price_at >= '2025-01-01T00:00:00Z' AND title > 'M'",
            "SELECT count(*) FROM ads_vw WHERE last_price_at >= '2025-01-01T00:00:00Z' AND title > 'M'",
        ),
    ] {
        let a: i64 = c.query_one(lake_sql, &[]).await.unwrap().get(0);
        let b: i64 = c.query_one(legacy_sql, &[]).await.unwrap().get(0);
        assert_eq!(a, b, "{lake_sql}");
    }
    // LIMIT (with its ORDER BY) goes to the server only when that is safe: one table, every
    // clause translated, ordered by plain columns of ordered types.
    let ids = |sql: String| {
        let c = &c;
        async move {
            let rows = c.query(&sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
            rows.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<i64>>()
        }
    };
    for (sql, pushed) in [
        (
            "SELECT listing_id FROM {t} WHERE price_last_eur > 1000 ORDER BY price_last_eur DESC, listing_id LIMIT 4",
            Some("LIMIT 4"),
        ),
        (
            "SELECT listing_id FROM {t} WHERE country IN ('DE', 'AT') OR zip IS NULL ORDER BY listing_id LIMIT 6 OFFSET 3",
            None,
        ),
        (
            "SELECT listing_id FROM {t} WHERE listing_id >= 5 ORDER BY listing_id DESC NULLS FIRST LIMIT 6 OFFSET 3",
            Some("LIMIT 9"),
        ),
        ("SELECT listing_id FROM {t} ORDER BY title, listing_id LIMIT 8", None),
    ] {
        let lake = ids(sql.replace("{t}", "lake_ads_vw")).await;
        let legacy = ids(sql.replace("{t}", "ads_vw")).await;
        assert!(!lake.is_empty());
        assert_eq!(lake, legacy, "{sql}");
        let server_log = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(p) = pushed {
            assert!(server_log.contains(p) && server_log.contains("ORDER BY"), "{sql}: {p} not pushed");
        }
    }
    let server_log = std::fs::read_to_string(&log).unwrap_or_default();
    for never in ["LIMIT 5", "LIMIT 7", "LIMIT 8", "LIMIT 6"] {
        assert!(!server_log.contains(never), "{never} must stay in PostgreSQL");
    }
    let plan: Vec<String> = c
        .query("EXPLAIN VERBOSE SELECT listing_id FROM lake_ads_vw ORDER BY listing_id LIMIT 3", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(plan.join("\n").contains("count: 3"), "{}", plan.join("\n"));

    // Aggregates run on the server only when that is safe; the answers are PostgreSQL's either way.
    let text_rows = |sql: String| {
        let c = &c;
        async move {
            let rows = c.query(&sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
            rows.iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| r.get::<_, Option<String>>(i).unwrap_or_default())
                        .collect::<Vec<_>>()
                        .join("|")
                })
                .collect::<Vec<String>>()
        }
    };
    c.batch_execute("CREATE AGGREGATE public.sum(integer) (SFUNC = int4pl, STYPE = integer, INITCOND = '1000')")
        .await
        .unwrap();
    // (Aggregates inside a subquery, cast to text outside: a cast around an aggregate is an
    // expression the framework does not push.)
    for (sql, pushed) in [
        (
            "SELECT c::text, s::text, mi::text, ma::text, d::text FROM (SELECT count(*) c, sum(price_last_eur) s, min(created_at) mi, max(listing_id) ma, count(DISTINCT model) d FROM {t} WHERE price_last_eur > 1000) q",
            true,
        ),
        (
            "SELECT fuel, c::text, s::text, m::text FROM (SELECT fuel, count(*) c, sum(price_last_eur) s, sum(mileage_km) m FROM {t} GROUP BY fuel) q ORDER BY fuel",
            true,
        ),
        ("SELECT c::text FROM (SELECT count(*) c FROM {t} WHERE lower(country) = 'de') q", false),
        (
            "SELECT fuel, c::text FROM (SELECT fuel, count(*) c FROM {t} GROUP BY fuel HAVING count(*) > 10) q ORDER BY fuel",
            false,
        ),
        (
            "SELECT country::text, c::text FROM (SELECT country, count(*) c FROM {t} GROUP BY country) q ORDER BY 1",
            false,
        ),
        ("SELECT a::text, m FROM (SELECT avg(price_last_eur) a, min(title) m FROM {t}) q", false),
        // A user's own aggregate named sum is not DataFusion's.
        ("SELECT s::text FROM (SELECT public.sum(mileage_km) s FROM {t} WHERE listing_id < 50) q", false),
    ] {
        let lake = text_rows(sql.replace("{t}", "lake_ads_vw")).await;
        assert!(!lake.is_empty());
        assert_eq!(lake, text_rows(sql.replace("{t}", "ads_vw")).await, "{sql}");
        let plan = text_rows(format!("EXPLAIN {}", sql.replace("{t}", "lake_ads_vw"))).await.join("\n");
        // A local aggregate is a plan node (Aggregate, HashAggregate, GroupAggregate).
        let local = plan.lines().any(|l| {
            let node = l.trim_start().trim_start_matches("->").trim_start();
            node.split_whitespace().next().is_some_and(|w| w.ends_with("Aggregate"))
        });
        assert_eq!(!local, pushed, "{sql}\n{plan}");
    }

    let sums: (String, String) = {
        let r = c
            .query_one(
                "SELECT (SELECT sum(price_last_eur)::text FROM lake_ads_vw), (SELECT sum(price_last_eur)::text FROM ads_vw)",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(sums.0, sums.1);

    // IMPORT FOREIGN SCHEMA: the lake's gold schema as foreign tables with exact types.
    c.batch_execute("CREATE SCHEMA lake; IMPORT FOREIGN SCHEMA gold FROM SERVER weir INTO lake;").await.unwrap();
    let t: String = c
        .query_one(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'lake.ads_vw'::regclass AND attname = 'price_drop_pct'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(t, "numeric(6,2)");
    assert_eq!(n("SELECT count(*) FROM lake.ads_vw").await, legacy);

    // `weir fdw install`: refuses to shadow the legacy table, then replaces it with a view
    // of exactly the legacy columns; `weir fdw rollback` puts the table back.
    let flight = format!("grpc://127.0.0.1:{}", server.port);
    let weir = |args: &[&str]| {
        let mut all = vec!["fdw"];
        all.extend_from_slice(args);
        std::process::Command::new(common::weir_bin())
            .args(&all)
            .args(["--pg", &url])
            .env("WEIR_FLIGHT_USER", "analyst")
            .env("WEIR_FLIGHT_PASSWORD", "s3cret")
            .output()
            .unwrap()
    };
    let before = common::column_types(&c, "ads_vw").await;
    let out = weir(&["install", "--flight", &flight]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("ads_vw") && stderr.contains("--replace-legacy"), "{stderr}");
    assert_eq!(n("SELECT count(*) FROM pg_class WHERE relname = 'ads_vw' AND relkind = 'r'").await, 1);
    let out = weir(&["install", "--flight", &flight, "--replace-legacy"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(n("SELECT count(*) FROM pg_class WHERE relname = 'ads_vw' AND relkind = 'v'").await, 1);
    assert_eq!(common::column_types(&c, "ads_vw").await, before, "the view has the legacy columns and types");
    assert_eq!(n("SELECT count(*) FROM (SELECT * FROM ads_vw EXCEPT ALL SELECT * FROM ads_vw_legacy) d").await, 0);
    assert_eq!(n("SELECT count(*) FROM (SELECT * FROM ads_vw_legacy EXCEPT ALL SELECT * FROM ads_vw) d").await, 0);
    let out = weir(&["rollback"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(n("SELECT count(*) FROM pg_class WHERE relname = 'ads_vw' AND relkind = 'r'").await, 1);
    assert_eq!(n("SELECT count(*) FROM pg_class WHERE relname = 'ads_vw_legacy'").await, 0);

    // A wrong password: the server's message, as a PostgreSQL error.
    c.batch_execute(&format!(
        "CREATE SERVER weir_bad FOREIGN DATA WRAPPER weir_fdw OPTIONS (url 'grpc://127.0.0.1:{}');
         CREATE USER MAPPING FOR CURRENT_USER SERVER weir_bad OPTIONS (user 'analyst', password 'nope');
         CREATE FOREIGN TABLE bad_ads (listing_id bigint) SERVER weir_bad OPTIONS (table 'gold.ads_vw');",
        server.port
    ))
    .await
    .unwrap();
    let err = c.query("SELECT * FROM bad_ads", &[]).await.unwrap_err();
    let msg = weir_postgres::conn::db_message(&err);
    assert!(msg.contains("wrong user or password"), "{msg}");

    // A server that accepts and never answers: statement_timeout still cancels.
    let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = stalled.local_addr().unwrap().port();
    let _hold = std::thread::spawn(move || {
        let mut held = vec![];
        for s in stalled.incoming().flatten() {
            held.push(s);
        }
    });
    c.batch_execute(&format!(
        "CREATE SERVER weir_stalled FOREIGN DATA WRAPPER weir_fdw OPTIONS (url 'grpc://127.0.0.1:{port}');
         CREATE USER MAPPING FOR CURRENT_USER SERVER weir_stalled OPTIONS (user 'analyst', password 's3cret');
         CREATE FOREIGN TABLE stalled_ads (listing_id bigint) SERVER weir_stalled OPTIONS (table 'gold.ads_vw');
         SET statement_timeout = '1s';"
    ))
    .await
    .unwrap();
    let t = Instant::now();
    let err = c.query("SELECT * FROM stalled_ads", &[]).await.unwrap_err();
    let took = t.elapsed();
    assert!(weir_postgres::conn::db_message(&err).contains("statement timeout"), "{err}");
    assert!(took < Duration::from_secs(3), "cancelled after {took:?}");

    // The backend keeps its connection and token between scans; a restarted server (which
    // has forgotten both) is reconnected and re-authenticated, not an error.
    c.batch_execute("RESET statement_timeout").await.unwrap();
    let port = server.port;
    drop(server);
    let _restarted = serve_at(&dir.path().join("lake"), &config, &[], None, port);
    assert_eq!(n("SELECT count(*) FROM lake_ads_vw").await, legacy);
    assert_eq!(
        n("SELECT count(*) FROM lake_ads_vw WHERE listing_id = 21").await,
        n("SELECT count(*) FROM ads_vw WHERE listing_id = 21").await
    );
}
