//! `weir generate` and `weir generate day` against a real PostgreSQL.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use weir_synth::schema::SOURCE_TABLES;
use weir_synth::{DayOptions, apply_day};

use crate::common::{self, scalar_i64};

async fn checksums(url: &str) -> BTreeMap<String, (i64, String)> {
    let c = common::client(url).await;
    let mut out = BTreeMap::new();
    for t in SOURCE_TABLES {
        let row = c
            .query_one(
                &format!("SELECT count(*), coalesce(md5(string_agg(x::text, E'\\n' ORDER BY x::text)), '') FROM {t} x"),
                &[],
            )
            .await
            .unwrap();
        out.insert(t.to_string(), (row.get(0), row.get(1)));
    }
    out
}

/// Same seed, same bytes: two databases generated with one seed have equal per-table
/// checksums; another seed gives different ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generator_is_deterministic() {
    let (pg, a) = common::marketplace(0.02, 7).await;
    let b = pg.create_database("second").unwrap();
    common::generate(&b, 0.02, 7).await;
    let c = pg.create_database("third").unwrap();
    common::generate(&c, 0.02, 8).await;
    let (ca, cb, cc) = (checksums(&a).await, checksums(&b).await, checksums(&c).await);
    assert_eq!(ca, cb);
    assert!(ca["listings"].0 >= 2_000, "{:?}", ca["listings"]);
    for t in ["models", "listings", "price_log", "fx_rates"] {
        assert_ne!(ca[t].1, cc[t].1, "{t}: a different seed must give different data");
    }
    // A second generate into the same database is refused without --replace.
    let err = weir_synth::generate(
        &a,
        &weir_synth::GenerateOptions { scale: 0.01, seed: 7, replace: false },
        std::sync::Arc::new(weir_synth::NoProgress),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("--replace"), "{err}");
}

/// The spec's shape and every hard case, at the smallest scale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_cases_are_present_at_small_scale() {
    let (_pg, url) = common::marketplace(0.01, 42).await;
    let c = common::client(&url).await;
    let checks: &[(&str, &str)] = &[
        ("15 countries", "SELECT count(DISTINCT country) = 15 FROM listings"),
        ("~40 makes", "SELECT count(*) BETWEEN 35 AND 45 FROM makes"),
        ("~1,500 models", "SELECT count(*) BETWEEN 1400 AND 1600 FROM models"),
        ("slugs with underscores", "SELECT count(*) >= 3 FROM makes WHERE slug LIKE '%\\_%'"),
        ("title with a double quote", "SELECT count(*) > 0 FROM listings WHERE title LIKE '%\"%'"),
        ("title with a comma", "SELECT count(*) > 0 FROM listings WHERE title LIKE '%,%'"),
        ("title with a tab", "SELECT count(*) > 0 FROM listings WHERE position(E'\\t' in title) > 0"),
        ("title with a newline", "SELECT count(*) > 0 FROM listings WHERE position(E'\\n' in title) > 0"),
        ("title with a backslash", "SELECT count(*) > 0 FROM listings WHERE position(E'\\\\' in title) > 0"),
        ("title with an emoji", "SELECT count(*) > 0 FROM listings WHERE title ~ '[\\U0001F300-\\U0001FAFF]'"),
        ("empty title", "SELECT count(*) > 0 FROM listings WHERE title = ''"),
        (
            "empty color and NULL color",
            "SELECT count(*) FILTER (WHERE color = '') > 0 AND count(*) FILTER (WHERE color IS NULL) > 0 FROM listings",
        ),
        (
            "empty zip and NULL zip",
            "SELECT count(*) FILTER (WHERE zip = '') > 0 AND count(*) FILTER (WHERE zip IS NULL) > 0 FROM listings",
        ),
        (
            "NULLs in every nullable listing column",
            "SELECT bool_and(n > 0) FROM (SELECT count(*) FILTER (WHERE first_registration IS NULL) n FROM listings UNION ALL SELECT count(*) FILTER (WHERE mileage_km IS NULL) FROM listings UNION ALL SELECT count(*) FILTER (WHERE power_kw IS NULL) FROM listings) s",
        ),
        (
            "price_first/price_last always NULL",
            "SELECT count(*) = 0 FROM listings WHERE price_first IS NOT NULL OR price_last IS NOT NULL",
        ),
        ("dealers with NULL zip", "SELECT count(*) > 0 FROM dealers WHERE zip IS NULL"),
        (
            "listings without price history",
            "SELECT count(*) > 0 FROM listings l WHERE NOT EXISTS (SELECT 1 FROM price_log p WHERE p.listing_id = l.listing_id)",
        ),
        (
            "5-15 price rows otherwise",
            "SELECT min(n) >= 1 AND max(n) <= 15 AND avg(n) BETWEEN 8 AND 11 FROM (SELECT count(*) n FROM price_log GROUP BY listing_id) s",
        ),
        (
            "currency switches",
            "SELECT count(*) > 0 FROM (SELECT listing_id FROM price_log GROUP BY listing_id HAVING count(DISTINCT currency) > 1) s",
        ),
        ("deleted listings", "SELECT count(*) FILTER (WHERE deleted_at IS NOT NULL) > 0 FROM listings"),
        (
            "FX products exactly on a half cent",
            "SELECT count(*) >= 4 FROM price_log p JOIN fx_rates f ON f.currency = p.currency AND f.day = (p.changed_at AT TIME ZONE 'UTC')::date WHERE (p.price * f.eur_per_unit * 100) % 1 = 0.5",
        ),
        (
            "a price row without an fx rate",
            "SELECT count(*) > 0 FROM price_log p WHERE p.currency <> 'EUR' AND NOT EXISTS (SELECT 1 FROM fx_rates f WHERE f.currency = p.currency AND f.day = (p.changed_at AT TIME ZONE 'UTC')::date)",
        ),
        ("numeric(12,2) at its maximum", "SELECT max(price) = 9999999999.99 FROM price_log"),
        (
            "microseconds before UTC midnight",
            "SELECT count(*) > 0 FROM price_log WHERE (changed_at AT TIME ZONE 'UTC')::time = '23:59:59.999999'",
        ),
        (
            "microseconds after UTC midnight",
            "SELECT count(*) > 0 FROM price_log WHERE (changed_at AT TIME ZONE 'UTC')::time = '00:00:00.000001'",
        ),
        (
            "one fx row per non-EUR currency per day",
            "SELECT count(DISTINCT currency) = 7 AND count(*) = count(DISTINCT (currency, day)) AND count(*) FILTER (WHERE currency = 'EUR') = 0 FROM fx_rates",
        ),
        (
            "EUR prices within a factor of 10",
            "SELECT coalesce(max(hi / nullif(lo, 0)), 0) <= 10 FROM (SELECT listing_id, max(price) hi, min(price) lo FROM price_log WHERE currency = 'EUR' GROUP BY listing_id) s",
        ),
        (
            "keys as in the spec",
            "SELECT count(*) = 6 FROM pg_constraint WHERE contype = 'p' AND conrelid::regclass::text IN ('makes','models','dealers','listings','price_log','fx_rates')",
        ),
    ];
    let mut failed = Vec::new();
    for (name, sql) in checks {
        let ok: Option<bool> = c.query_one(*sql, &[]).await.unwrap_or_else(|e| panic!("{name}: {sql}: {e}")).get(0);
        if ok != Some(true) {
            failed.push(*name);
        }
    }
    assert!(failed.is_empty(), "hard cases missing: {failed:?}");
}

/// A day of change changes what the spec says it changes, is deterministic, and is refused
/// a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_of_change() {
    let (pg, url) = common::marketplace(0.02, 3).await;
    let c = common::client(&url).await;
    let count = |sql: &'static str| {
        let c = &c;
        async move { scalar_i64(c, sql).await }
    };
    let listings0 = count("SELECT count(*) FROM listings").await;
    let active0 = count("SELECT count(*) FROM listings WHERE deleted_at IS NULL").await;
    let prices0 = count("SELECT count(*) FROM price_log").await;
    let date = NaiveDate::from_ymd_opt(2026, 7, 1).unwrap();
    let opts = DayOptions { date, seed: 9, taxonomy_rate: 1.0 };
    let r = apply_day(&url, &opts).await.unwrap();

    let share = |n: u64| n as f64 / active0 as f64;
    assert!((0.005..=0.021).contains(&share(r.new_listings)), "new {}", r.new_listings);
    assert!((0.049..=0.201).contains(&share(r.updated)), "updated {}", r.updated);
    assert!(r.soft_deleted >= 1 && share(r.soft_deleted) <= 0.006, "soft {}", r.soft_deleted);
    assert!((1..=3).contains(&r.hard_deleted.len()), "hard {:?}", r.hard_deleted);
    assert_eq!(r.fx_rows, 7);
    assert_eq!(r.taxonomy_changes.len(), 1);
    assert!(r.dealer_updates >= 1);

    let day = "(timestamptz '2026-07-01 00:00:00+00')";
    assert_eq!(
        count("SELECT count(*) FROM listings").await,
        listings0 + r.new_listings as i64 - r.hard_deleted.len() as i64
    );
    let erased: i64 = c
        .query_one("SELECT (SELECT count(*) FROM listings WHERE listing_id = ANY($1)) + (SELECT count(*) FROM price_log WHERE listing_id = ANY($1))", &[&r.hard_deleted])
        .await
        .unwrap()
        .get(0);
    assert_eq!(erased, 0, "hard-deleted listings and their prices are gone");
    assert_eq!(
        scalar_i64(&c, &format!("SELECT count(*) FROM listings WHERE deleted_at >= {day}")).await,
        r.soft_deleted as i64
    );
    assert_eq!(
        scalar_i64(&c, &format!("SELECT count(*) FROM listings WHERE created_at >= {day}")).await,
        r.new_listings as i64
    );
    assert_eq!(
        scalar_i64(
            &c,
            &format!(
                "SELECT count(*) FROM listings WHERE updated_at >= {day} AND created_at < {day} AND deleted_at IS NULL"
            )
        )
        .await,
        r.updated as i64
    );
    assert_eq!(
        scalar_i64(&c, &format!("SELECT count(*) FROM price_log WHERE changed_at >= {day}")).await,
        r.price_rows as i64
    );
    assert!(r.price_rows as f64 >= 0.03 * active0 as f64, "prices {}", r.price_rows);
    assert!(count("SELECT count(*) FROM price_log").await > prices0);
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM fx_rates WHERE day = '2026-07-01'").await, 7);
    assert_eq!(scalar_i64(&c, &format!("SELECT count(*) FROM models WHERE updated_at >= {day}")).await, 1);
    assert_eq!(
        scalar_i64(&c, &format!("SELECT count(*) FROM dealers WHERE updated_at >= {day}")).await,
        r.dealer_updates as i64
    );
    // New price rows keep the (listing_id, changed_at) key and come after the listing's history.
    assert_eq!(
        scalar_i64(&c, &format!("SELECT count(*) FROM price_log p WHERE changed_at >= {day} AND EXISTS (SELECT 1 FROM price_log q WHERE q.listing_id = p.listing_id AND q.changed_at > p.changed_at)")).await,
        0
    );

    // The same day again: refused, nothing changed.
    let err = apply_day(&url, &opts).await.unwrap_err();
    assert!(err.to_string().contains("already applied"), "{err}");
    // A day before the latest: refused.
    let err = apply_day(&url, &DayOptions { date: NaiveDate::from_ymd_opt(2026, 6, 15).unwrap(), ..opts.clone() })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not after"), "{err}");

    // Deterministic: the same seed and day on a second copy give the same data.
    let b = pg.create_database("copy").unwrap();
    common::generate(&b, 0.02, 3).await;
    let rb = apply_day(&b, &opts).await.unwrap();
    assert_eq!(r, rb);
    assert_eq!(checksums(&url).await, checksums(&b).await);
}
