//! The hard cases: listings present at every scale (ids 1..=HARD_CASES) that pin down the
//! parts of the contract that are easy to get wrong. Each one says what it tests.

use chrono::{NaiveDate, TimeZone, Utc};

use crate::catalog;
use crate::model::{Listing, Price, Taxonomy};

/// Listing ids 1..=HARD_CASES are the hard cases; generated listings follow.
pub const HARD_CASES: i64 = 20;

pub fn day(y: i32, m: u32, d: u32) -> i32 {
    let date = NaiveDate::from_ymd_opt(y, m, d).expect("valid date");
    (date - NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch")).num_days() as i32
}

pub fn ts(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32, micro: u32) -> i64 {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s).single().expect("valid time").timestamp_micros() + i64::from(micro)
}

/// Rates pinned so that prices land exactly on half cents (see cases 5, 6 and 9).
pub fn forced_rate(currency: &str, unix_day: i32) -> Option<i64> {
    [
        ("CZK", day(2025, 5, 5), 4_500_000),  // 0.045
        ("SEK", day(2025, 5, 6), 8_500_000),  // 0.085
        ("PLN", day(2025, 3, 1), 23_000_000), // 0.23
        ("PLN", day(2025, 3, 2), 23_500_000), // 0.235
    ]
    .iter()
    .find(|(c, d, _)| *c == currency && *d == unix_day)
    .map(|(_, _, r)| *r)
}

/// The hard-case listings and their price rows.
pub fn hard_cases(tax: &Taxonomy) -> Vec<(Listing, Vec<Price>)> {
    let base = |id: i64, country: &'static str, make: &str| -> Listing {
        let mi = tax.make_index(make).expect("hard-case make exists");
        let make_row = &tax.makes[mi];
        let model = &tax.models[tax.models_by_make[mi][0]];
        let ci = catalog::country_index(country).expect("hard-case country");
        Listing {
            listing_id: id,
            country,
            make_id: make_row.make_id,
            model_id: model.model_id,
            dealer_id: tax.dealers_by_country[ci][0],
            title: format!("{} {} 1.5 TSI", make_row.name, model.name),
            fuel: "petrol",
            gearbox: "manual",
            first_registration: Some(day(2019, 4, 1)),
            mileage_km: Some(54_321),
            power_kw: Some(110),
            color: Some("blue".to_string()),
            zip: Some("10115".to_string()),
            created_at: ts(2025, 1, 10, 9, 30, 0, 0),
            updated_at: ts(2025, 2, 10, 9, 30, 0, 0),
            deleted_at: None,
        }
    };
    let p = |id: i64, at: i64, cents: i64, currency: &'static str| Price {
        listing_id: id,
        changed_at: at,
        cents,
        currency,
    };
    let eur_path = |id: i64, cents: &[i64]| -> Vec<Price> {
        cents
            .iter()
            .enumerate()
            .map(|(i, c)| p(id, ts(2025, 1, 10, 10, 0, 0, 0) + i as i64 * 7 * 86_400_000_000, *c, "EUR"))
            .collect()
    };
    let mut out = Vec::new();

    // 1. Text that breaks naive CSV/TSV/JSON: quotes, commas, tab, newline, backslashes, emoji;
    //    empty color vs NULL zip; power_kw 57 → 77.49834 hp (rounds down, a float trap).
    let mut l = base(1, "DE", "vw");
    l.title = "VW Golf \"GTI\", 2.0 TSI\tDSG\nTop-Zustand \\ C:\\Temp\\ 🚗💨 'quoted' ;|".to_string();
    l.color = Some(String::new());
    l.zip = None;
    l.power_kw = Some(57);
    out.push((l, eur_path(1, &[2_499_000, 2_399_000, 2_299_000])));

    // 2. Empty strings are not NULL: empty title and zip, NULL color; 260 kW → 353.5012 hp.
    let mut l = base(2, "AT", "vw");
    l.title = String::new();
    l.zip = Some(String::new());
    l.color = None;
    l.power_kw = Some(260);
    out.push((l, eur_path(2, &[1_500_000, 1_450_000, 1_400_000, 1_390_000, 1_380_000])));

    // 3. No price history at all: NULL price columns, price_changes 0.
    out.push((base(3, "FR", "vw"), vec![]));

    // 4. Currency switches: CHF → EUR → CHF.
    let l = base(4, "CH", "vw");
    out.push((
        l,
        vec![
            p(4, ts(2025, 1, 10, 10, 0, 0, 0), 2_500_000, "CHF"),
            p(4, ts(2025, 1, 20, 10, 0, 0, 0), 2_450_000, "CHF"),
            p(4, ts(2025, 2, 1, 10, 0, 0, 0), 2_490_000, "EUR"),
            p(4, ts(2025, 2, 15, 10, 0, 0, 0), 2_390_000, "CHF"),
        ],
    ));

    // 5. Exact half cents in CZK at 0.045: 4001 → 180.045 → 180.05; 3999 → 179.955 → 179.96.
    let mut l = base(5, "CZ", "vw");
    l.created_at = ts(2025, 5, 5, 7, 0, 0, 0);
    l.updated_at = l.created_at;
    out.push((
        l,
        vec![p(5, ts(2025, 5, 5, 8, 0, 0, 0), 400_100, "CZK"), p(5, ts(2025, 5, 5, 20, 0, 0, 0), 399_900, "CZK")],
    ));

    // 6. Exact half cents in SEK at 0.085: 1001 → 85.085 → 85.09; 999 → 84.915 → 84.92.
    let mut l = base(6, "SE", "vw");
    l.created_at = ts(2025, 5, 6, 7, 0, 0, 0);
    l.updated_at = l.created_at;
    out.push((
        l,
        vec![p(6, ts(2025, 5, 6, 8, 0, 0, 0), 100_100, "SEK"), p(6, ts(2025, 5, 6, 9, 0, 0, 0), 99_900, "SEK")],
    ));

    // 7. numeric(12,2) at its maximum, in EUR.
    out.push((base(7, "DE", "vw"), eur_path(7, &[999_999_999_999, 950_000_000_000, 999_999_999_999])));

    // 8. 99,999,999.99: the value DuckDB overflows on when multiplying by 1.05 without widening.
    out.push((base(8, "LU", "vw"), eur_path(8, &[9_999_999_999, 9_499_999_999])));

    // 9. Microseconds next to UTC midnight: the fx day flips between the two rows
    //    (0.23 vs 0.235: 50001 PLN → 11500.23; 49999 PLN → 11749.765 → 11749.77), and a
    //    listing online for one microsecond across midnight has days_online 1.
    let mut l = base(9, "PL", "vw");
    l.created_at = ts(2025, 3, 1, 23, 59, 59, 999_999);
    l.deleted_at = Some(ts(2025, 3, 2, 0, 0, 0, 0));
    l.updated_at = ts(2025, 3, 2, 0, 0, 0, 0);
    out.push((
        l,
        vec![
            p(9, ts(2025, 3, 1, 23, 59, 59, 999_999), 5_000_100, "PLN"),
            p(9, ts(2025, 3, 2, 0, 0, 0, 1), 4_999_900, "PLN"),
        ],
    ));

    // 10. A rate that does not exist (the day before fx history starts): that row's EUR value is
    //     NULL; min/max skip it, first takes it as it is (so price_drop_pct is NULL).
    let mut l = base(10, "DK", "vw");
    l.created_at = ts(2024, 6, 30, 22, 0, 0, 0);
    out.push((
        l,
        vec![
            p(10, ts(2024, 6, 30, 23, 30, 0, 0), 15_000_000, "DKK"),
            p(10, ts(2024, 7, 2, 10, 0, 0, 0), 14_900_000, "DKK"),
            p(10, ts(2024, 7, 15, 10, 0, 0, 0), 14_500_000, "DKK"),
        ],
    ));

    // 11. / 12. price_drop_pct on an exact half, both signs: ±12.345 → ±12.35.
    out.push((base(11, "NL", "vw"), eur_path(11, &[20_000, 17_531])));
    out.push((base(12, "BE", "vw"), eur_path(12, &[20_000, 22_469])));

    // 13. A zero price: price_first_eur 0 → price_drop_pct NULL (no division by zero).
    out.push((base(13, "IT", "vw"), eur_path(13, &[0, 0])));

    // 14. Every nullable column NULL, one price row (price_changes 0).
    let mut l = base(14, "ES", "vw");
    l.first_registration = None;
    l.mileage_km = None;
    l.power_kw = None;
    l.color = None;
    l.zip = None;
    out.push((l, eur_path(14, &[1_234_500])));

    // 15. / 16. Makes whose slug has an underscore; accents, CJK, guillemets, apostrophes.
    let mut l = base(15, "DE", "mercedes_benz");
    l.title = "Mercedes-Benz C 220 d T-Modell – Ümläüte ÄÖÜß, çñ «ok» 日本".to_string();
    out.push((l, eur_path(15, &[3_100_000, 2_990_000])));
    let mut l = base(16, "IT", "alfa_romeo");
    l.title = "Alfa Romeo Giulia 2.2 'Veloce' — l'auto dell'anno".to_string();
    out.push((l, eur_path(16, &[2_800_000, 2_750_000, 2_700_000])));

    // 17. Deleted, created a microsecond before midnight.
    let mut l = base(17, "FR", "vw");
    l.created_at = ts(2025, 1, 1, 23, 59, 59, 999_999);
    l.deleted_at = Some(ts(2025, 10, 10, 12, 0, 0, 0));
    l.updated_at = ts(2025, 10, 10, 12, 0, 0, 0);
    out.push((l, eur_path(17, &[1_000_000, 990_000])));

    // 18. Repeating decimals in price_drop_pct: 100 × 0.01 / 30 = 0.0333… → 0.03.
    out.push((base(18, "DE", "vw"), eur_path(18, &[3_000, 2_999])));

    // 19. A price rise within a factor of 10 (negative drop: -900.00) and whole-euro values.
    out.push((base(19, "AT", "vw"), eur_path(19, &[100_000, 1_000_000])));

    // 20. Deleted before any price could change, still one price row, created at midnight.
    let mut l = base(20, "HU", "vw");
    l.created_at = ts(2025, 6, 1, 0, 0, 0, 0);
    l.deleted_at = Some(ts(2025, 6, 1, 0, 0, 0, 1));
    l.updated_at = ts(2025, 6, 1, 0, 0, 0, 1);
    out.push((l, vec![p(20, ts(2025, 6, 1, 0, 0, 0, 0), 999_990_000, "HUF")]));

    debug_assert_eq!(out.len() as i64, HARD_CASES);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// EUR cents of `cents × rate_e8 / 1e8`, rounded half away from zero, exactly.
    fn eur_cents(cents: i64, rate_e8: i64) -> (i128, bool) {
        let prod = i128::from(cents) * i128::from(rate_e8); // scale 10
        let q = prod / 100_000_000;
        let r = prod % 100_000_000;
        (if r * 2 >= 100_000_000 { q + 1 } else { q }, r * 2 == 100_000_000)
    }

    #[test]
    fn pinned_rates_land_on_half_cents() {
        let czk = forced_rate("CZK", day(2025, 5, 5)).unwrap();
        assert_eq!(eur_cents(400_100, czk), (18_005, true));
        assert_eq!(eur_cents(399_900, czk), (17_996, true));
        let sek = forced_rate("SEK", day(2025, 5, 6)).unwrap();
        assert_eq!(eur_cents(100_100, sek), (8_509, true));
        assert_eq!(eur_cents(99_900, sek), (8_492, true));
        let pln2 = forced_rate("PLN", day(2025, 3, 2)).unwrap();
        assert_eq!(eur_cents(4_999_900, pln2), (1_174_977, true));
        assert_eq!(forced_rate("PLN", day(2025, 3, 3)), None);
    }

    #[test]
    fn midnight_case_spans_two_utc_days() {
        assert_eq!(day(2025, 3, 2) - day(2025, 3, 1), 1);
        let a = ts(2025, 3, 1, 23, 59, 59, 999_999);
        let b = ts(2025, 3, 2, 0, 0, 0, 1);
        assert_eq!(b - a, 2);
        assert_ne!(crate::model::unix_day(a), crate::model::unix_day(b));
    }
}
