//! The legacy mart pipeline: schema exactly per the spec, one row per listing, and the spec's
//! arithmetic on the hard cases (expected values worked out by hand from the spec).

use chrono::{TimeZone, Utc};

use crate::common::{self, scalar_i64};

/// The spec's 30 columns, transcribed from ../shared/spec/source-and-mart.md.
const SPEC: &[(&str, &str)] = &[
    ("listing_id", "bigint"),
    ("country", "character(2)"),
    ("make", "text"),
    ("model", "text"),
    ("segment", "text"),
    ("body_type", "text"),
    ("dealer_id", "bigint"),
    ("seller_kind", "text"),
    ("fuel", "text"),
    ("gearbox", "text"),
    ("first_registration", "date"),
    ("registration_year", "smallint"),
    ("mileage_km", "integer"),
    ("power_kw", "smallint"),
    ("power_hp", "smallint"),
    ("title", "text"),
    ("zip", "text"),
    ("price_first_eur", "numeric(12,2)"),
    ("price_last_eur", "numeric(12,2)"),
    ("price_min_eur", "numeric(12,2)"),
    ("price_max_eur", "numeric(12,2)"),
    ("price_changes", "integer"),
    ("first_price_at", "timestamp with time zone"),
    ("last_price_at", "timestamp with time zone"),
    ("created_at", "timestamp with time zone"),
    ("updated_at", "timestamp with time zone"),
    ("deleted_at", "timestamp with time zone"),
    ("is_active", "boolean"),
    ("days_online", "integer"),
    ("price_drop_pct", "numeric(6,2)"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_mart_matches_the_spec() {
    let (_pg, url) = common::marketplace(0.01, 42).await;
    let mut c = common::client(&url).await;
    let as_of = Utc.with_ymd_and_hms(2026, 7, 1, 0, 0, 0).unwrap();
    for slug in ["vw", "mercedes_benz"] {
        let r = weir_synth::build_legacy_mart(&mut c, slug, as_of).await.unwrap();
        assert_eq!(r.table, format!("ads_{slug}"));
        let cols: Vec<(String, String)> = common::column_types(&c, &r.table).await;
        let want: Vec<(String, String)> = SPEC.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        assert_eq!(cols, want, "{} columns", r.table);
        let listings = scalar_i64(
            &c,
            &format!("SELECT count(*) FROM listings l JOIN makes m USING (make_id) WHERE m.slug = '{slug}'"),
        )
        .await;
        assert_eq!(r.rows as i64, listings);
        assert_eq!(scalar_i64(&c, &format!("SELECT count(DISTINCT listing_id) FROM ads_{slug}")).await, listings);
        assert_eq!(
            scalar_i64(&c, &format!("SELECT count(*) FROM ads_{slug} a JOIN listings l USING (listing_id) JOIN makes m ON m.make_id = l.make_id WHERE m.slug <> '{slug}'")).await,
            0
        );
    }
    // Rebuilding replaces (TRUNCATE + INSERT): same row count, not doubled.
    let again = weir_synth::build_legacy_mart(&mut c, "vw", as_of).await.unwrap();
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM ads_vw").await, again.rows as i64);

    // The hard cases, worked out from the spec by hand.
    let expect: &[(i64, &str, &str)] = &[
        (1, "power_hp::text", "77"),  // 57 kW × 1.35962 = 77.498…
        (2, "power_hp::text", "354"), // 260 kW × 1.35962 = 353.501…
        (2, "(title = '' AND zip = '')::text", "true"),
        (3, "concat_ws('|', price_first_eur, price_changes, first_price_at, price_drop_pct)", "0"),
        (5, "price_first_eur::text || ' ' || price_last_eur::text", "180.05 179.96"), // 4001 × 0.045, 3999 × 0.045
        (6, "price_first_eur::text || ' ' || price_last_eur::text", "85.09 84.92"),   // 1001 × 0.085, 999 × 0.085
        (
            7,
            "price_first_eur::text || ' ' || price_max_eur::text || ' ' || price_drop_pct::text",
            "9999999999.99 9999999999.99 0.00",
        ),
        (8, "price_drop_pct::text", "5.00"), // 100 × 5,000,000.00 / 99,999,999.99
        (9, "price_first_eur::text || ' ' || price_last_eur::text || ' ' || days_online", "11500.23 11749.77 1"),
        (
            10,
            "(price_first_eur IS NULL AND price_drop_pct IS NULL AND price_min_eur IS NOT NULL AND price_changes = 2)::text",
            "true",
        ),
        (11, "price_drop_pct::text", "12.35"), // 100 × 24.69 / 200 = 12.345
        (12, "price_drop_pct::text", "-12.35"),
        (13, "(price_first_eur = 0 AND price_drop_pct IS NULL)::text", "true"),
        (14, "concat_ws('|', registration_year, power_hp, price_changes, is_active)", "0|t"),
        (18, "price_drop_pct::text", "0.03"),
        (19, "price_drop_pct::text", "-900.00"),
        (17, "days_online::text || ' ' || is_active::text", "282 false"), // 2025-01-01 → 2025-10-10
        (20, "days_online::text || ' ' || price_changes::text", "0 0"),
    ];
    let mut wrong = Vec::new();
    for (id, expr, want) in expect {
        let got: Option<String> = c
            .query_one(&format!("SELECT ({expr})::text FROM ads_vw WHERE listing_id = $1"), &[id])
            .await
            .unwrap()
            .get(0);
        if got.as_deref() != Some(*want) {
            wrong.push(format!("listing {id}: {expr} = {got:?}, expected {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    // Underscore slug and text byte for byte.
    let t: String = c.query_one("SELECT title FROM ads_mercedes_benz WHERE listing_id = 15", &[]).await.unwrap().get(0);
    assert_eq!(t, "Mercedes-Benz C 220 d T-Modell – Ümläüte ÄÖÜß, çñ «ok» 日本");
    let t: String = c.query_one("SELECT title FROM ads_vw WHERE listing_id = 1", &[]).await.unwrap().get(0);
    assert_eq!(t, "VW Golf \"GTI\", 2.0 TSI\tDSG\nTop-Zustand \\ C:\\Temp\\ 🚗💨 'quoted' ;|");

    // An unknown make is refused, naming the slug.
    let err = weir_synth::build_legacy_mart(&mut c, "trabant", as_of).await.unwrap_err();
    assert!(err.to_string().contains("\"trabant\""), "{err}");
}

/// A price_drop_pct that does not fit numeric(6,2) fails the build, naming the listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_pct_overflow_names_the_listing() {
    let (_pg, url) = common::marketplace(0.01, 1).await;
    let mut c = common::client(&url).await;
    // Break the generator's factor-of-10 rule on purpose: 0.01 → 9,999.99 EUR.
    c.batch_execute(
        "DELETE FROM price_log WHERE listing_id = 13;
         INSERT INTO price_log VALUES (13, '2025-03-01 12:00:00+00', 0.01, 'EUR'), (13, '2025-03-02 12:00:00+00', 9999.99, 'EUR');",
    )
    .await
    .unwrap();
    let as_of = Utc.with_ymd_and_hms(2026, 7, 1, 0, 0, 0).unwrap();
    let err = weir_synth::build_legacy_mart(&mut c, "vw", as_of).await.unwrap_err();
    assert!(err.to_string().contains("listing 13") && err.to_string().contains("numeric(6,2)"), "{err}");
}
