//! `weir generate day`: one day of production-like change, deterministic for (seed, date).

use chrono::NaiveDate;
use tokio_postgres::Client;
use weir_postgres::{CopyBinaryWriter, PgError, connect, copy};

use crate::SynthError;
use crate::catalog::{self, COUNTRIES, MAKES};
use crate::model::{self, MICROS_PER_DAY, Make, Model, Taxonomy, Window};
use crate::rng::Rng;
use crate::schema;

#[derive(Debug, Clone)]
pub struct DayOptions {
    pub date: NaiveDate,
    pub seed: u64,
    /// Probability that the day carries a taxonomy change (a model renamed or moved).
    pub taxonomy_rate: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DayReport {
    pub new_listings: u64,
    pub updated: u64,
    pub soft_deleted: u64,
    pub hard_deleted: Vec<i64>,
    pub price_rows: u64,
    pub fx_rows: u64,
    pub taxonomy_changes: Vec<String>,
    pub dealer_updates: u64,
}

fn unix_days(d: NaiveDate) -> i32 {
    (d - NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch")).num_days() as i32
}

/// Applies one day of change in one transaction.
pub async fn apply_day(url: &str, opts: &DayOptions) -> Result<DayReport, SynthError> {
    if !(0.0..=1.0).contains(&opts.taxonomy_rate) {
        return Err(SynthError::TaxonomyRate(opts.taxonomy_rate));
    }
    let client = connect(url).await?;
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('public.listings') IS NOT NULL AND to_regclass('public.fx_rates') IS NOT NULL",
            &[],
        )
        .await
        .map_err(PgError::query("looking for the marketplace"))?
        .get(0);
    if !exists {
        return Err(SynthError::NoMarketplace("listings".to_string()));
    }
    client.batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE").await.map_err(PgError::query("BEGIN"))?;
    let report = apply_in_tx(&client, opts).await;
    match report {
        Ok(r) => {
            client.batch_execute("COMMIT").await.map_err(PgError::query("COMMIT"))?;
            Ok(r)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

async fn apply_in_tx(c: &Client, opts: &DayOptions) -> Result<DayReport, SynthError> {
    let q = |ctx: &'static str| PgError::query(ctx);
    let day = unix_days(opts.date);
    let latest: Option<NaiveDate> =
        c.query_one("SELECT max(day) FROM fx_rates", &[]).await.map_err(q("reading fx_rates"))?.get(0);
    if let Some(latest) = latest
        && opts.date <= latest
    {
        return Err(if opts.date == latest {
            SynthError::DayApplied { day: opts.date.to_string() }
        } else {
            SynthError::DayNotAfter { day: opts.date.to_string(), latest: latest.to_string() }
        });
    }
    let mut rng = Rng::derive(opts.seed, 50, day as u64);
    let day_start = i64::from(day) * MICROS_PER_DAY;
    let at = |rng: &mut Rng| day_start + rng.range(0, MICROS_PER_DAY - 1);
    let mut report = DayReport::default();

    let tax = load_taxonomy(c).await?;
    let mut active: Vec<i64> = c
        .query("SELECT listing_id FROM listings WHERE deleted_at IS NULL ORDER BY listing_id", &[])
        .await
        .map_err(q("reading active listings"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let max_id: i64 = c
        .query_one("SELECT coalesce(max(listing_id), 0) FROM listings", &[])
        .await
        .map_err(q("reading listings"))?
        .get(0);
    let n = active.len();
    // A fixed shuffle of the active listings; the day's sets are disjoint slices of it.
    // The newest listing is never erased, so ids are never reused.
    active.retain(|id| *id != max_id);
    for i in (1..active.len()).rev() {
        active.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let frac = |rng: &mut Rng, lo: f64, hi: f64| ((n as f64) * (lo + rng.unit() * (hi - lo))).round() as usize;
    let n_hard = (n / 20_000).clamp(1, 3);
    let n_soft = frac(&mut rng, 0.005, 0.005).max(1);
    let n_price = frac(&mut rng, 0.03, 0.10).max(1);
    let n_update = frac(&mut rng, 0.05, 0.20).max(1);
    let n_new = frac(&mut rng, 0.005, 0.02).max(1);
    let mut take = |k: usize| -> Vec<i64> {
        let k = k.min(active.len());
        active.drain(..k).collect()
    };
    let hard = take(n_hard);
    let soft = take(n_soft);
    let priced = take(n_price);
    let updated = take(n_update);

    // Updates: mileage grows, some titles and zips change.
    let (mut ids, mut deltas, mut suffixes, mut zips, mut times) = (vec![], vec![], vec![], vec![], vec![]);
    for id in &updated {
        ids.push(*id);
        deltas.push(rng.range(5, 2_500) as i32);
        suffixes.push(
            rng.chance(0.3)
                .then(|| rng.pick(&[" – Preis VB", " (reduziert)", " – prix négociable", ", nová STK"]).to_string()),
        );
        let zc = rng_country(&mut rng);
        zips.push(rng.chance(0.1).then(|| model::gen_zip(&mut rng, zc)));
        times.push(micros_to_ts(at(&mut rng)));
    }
    report.updated = c
        .execute(
            "UPDATE listings l SET mileage_km = l.mileage_km + u.delta,
                    title = CASE WHEN u.suffix IS NULL THEN l.title ELSE l.title || u.suffix END,
                    zip = coalesce(u.zip, l.zip),
                    updated_at = u.t
             FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[], $5::timestamptz[]) AS u(id, delta, suffix, zip, t)
             WHERE l.listing_id = u.id",
            &[&ids, &deltas, &suffixes, &zips, &times],
        )
        .await
        .map_err(q("updating listings"))?;

    // Soft deletes.
    let soft_times: Vec<_> = soft.iter().map(|_| micros_to_ts(at(&mut rng))).collect();
    report.soft_deleted = c
        .execute(
            "UPDATE listings l SET deleted_at = u.t, updated_at = u.t
             FROM unnest($1::bigint[], $2::timestamptz[]) AS u(id, t) WHERE l.listing_id = u.id",
            &[&soft, &soft_times],
        )
        .await
        .map_err(q("soft-deleting listings"))?;

    // Hard deletes (GDPR erasure): the listing and its price history.
    c.execute("DELETE FROM price_log WHERE listing_id = ANY($1)", &[&hard])
        .await
        .map_err(q("erasing price_log rows"))?;
    c.execute("DELETE FROM listings WHERE listing_id = ANY($1)", &[&hard]).await.map_err(q("erasing listings"))?;
    report.hard_deleted = hard;

    // New prices, in the listing's current currency.
    let last: Vec<(i64, String, String)> = c
        .query(
            "SELECT DISTINCT ON (listing_id) listing_id, price::text, currency::text FROM price_log
             WHERE listing_id = ANY($1) ORDER BY listing_id, changed_at DESC",
            &[&priced],
        )
        .await
        .map_err(q("reading last prices"))?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let mut pw = CopyBinaryWriter::default();
    for (id, price, currency) in &last {
        let cents = parse_scaled(price, 2);
        let factor = if rng.chance(0.8) { 1.0 - rng.unit() * 0.06 } else { 1.0 + rng.unit() * 0.04 };
        let currency = static_currency(currency);
        let p = model::Price { listing_id: *id, changed_at: at(&mut rng), cents: next_price(cents, factor), currency };
        schema::encode_price(&mut pw, &p);
        report.price_rows += 1;
    }

    // New listings, each with its first price.
    let window = Window {
        start: day_start,
        end: day_start + MICROS_PER_DAY,
        horizon: day_start + MICROS_PER_DAY,
        deleted_share: 0.0,
        prices: (1, 1),
        no_price_share: 0.0,
    };
    let day_seed = opts.seed ^ (u64::from(day as u32) << 20);
    let mut lw = CopyBinaryWriter::default();
    for id in max_id + 1..=max_id + n_new as i64 {
        let (l, ps) = model::gen_listing(day_seed, id, &tax, &window);
        schema::encode_listing(&mut lw, &l);
        for p in &ps {
            schema::encode_price(&mut pw, p);
            report.price_rows += 1;
        }
        report.new_listings += 1;
    }
    copy::copy_in(c, "COPY listings FROM STDIN (FORMAT binary)", [lw.take()]).await?;
    copy::copy_in(c, "COPY price_log FROM STDIN (FORMAT binary)", [pw.take()]).await?;

    // The day's fx rates: one step of the random walk from the latest rate.
    let rates: Vec<(String, String)> = c
        .query("SELECT DISTINCT ON (currency) currency::text, eur_per_unit::text FROM fx_rates ORDER BY currency, day DESC", &[])
        .await
        .map_err(q("reading fx rates"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut fw = CopyBinaryWriter::default();
    for (currency, base) in catalog::FX_CURRENCIES {
        let prev = rates.iter().find(|(cur, _)| cur == currency).map_or(base * 1e8, |(_, r)| parse_scaled(r, 8) as f64);
        let rate_e8 = (prev * (1.0 + (rng.unit() - 0.5) * 0.006)).round() as i64;
        schema::encode_fx(&mut fw, &model::Fx { currency, day, rate_e8 });
        report.fx_rows += 1;
    }
    copy::copy_in(c, "COPY fx_rates FROM STDIN (FORMAT binary)", [fw.take()]).await?;

    // Occasionally, a taxonomy change.
    if rng.chance(opts.taxonomy_rate) && !tax.models.is_empty() {
        let m = rng.pick(&tax.models).clone();
        let t = micros_to_ts(at(&mut rng));
        if rng.chance(0.5) {
            let new_name = format!("{} II", m.name);
            c.execute(
                "UPDATE models SET name = $2, updated_at = $3 WHERE model_id = $1",
                &[&m.model_id, &new_name, &t],
            )
            .await
            .map_err(q("renaming a model"))?;
            report.taxonomy_changes.push(format!("model {} renamed {:?} → {:?}", m.model_id, m.name, new_name));
        } else {
            let others: Vec<&str> = catalog::SEGMENTS.iter().map(|s| s.0).filter(|s| *s != m.segment).collect();
            let seg = *rng.pick(&others);
            c.execute("UPDATE models SET segment = $2, updated_at = $3 WHERE model_id = $1", &[&m.model_id, &seg, &t])
                .await
                .map_err(q("moving a model"))?;
            report
                .taxonomy_changes
                .push(format!("model {} {:?} moved from segment {} to {}", m.model_id, m.name, m.segment, seg));
        }
    }

    // Dealer updates: a new name or zip.
    let dealer_ids: Vec<i64> = tax.dealers_by_country.iter().flatten().copied().collect();
    let k = (dealer_ids.len() / 200).max(1);
    let (mut dids, mut names, mut dzips, mut dtimes) = (vec![], vec![], vec![], vec![]);
    for _ in 0..k {
        dids.push(*rng.pick(&dealer_ids));
        names.push(format!("{} {}", rng.pick(catalog::DEALER_WORDS), rng.pick(catalog::SURNAMES)));
        let zc = rng_country(&mut rng);
        dzips.push(rng.chance(0.5).then(|| model::gen_zip(&mut rng, zc)));
        dtimes.push(micros_to_ts(at(&mut rng)));
    }
    // A dealer drawn twice keeps its last update (DISTINCT ON keeps the first of a reversed list).
    report.dealer_updates = c
        .execute(
            "UPDATE dealers d SET name = u.name, zip = coalesce(u.zip, d.zip), updated_at = u.t
             FROM (SELECT DISTINCT ON (id) id, name, zip, t FROM unnest($1::bigint[], $2::text[], $3::text[], $4::timestamptz[]) WITH ORDINALITY AS x(id, name, zip, t, o) ORDER BY id, o DESC) u
             WHERE d.dealer_id = u.id",
            &[&dids, &names, &dzips, &dtimes],
        )
        .await
        .map_err(q("updating dealers"))?;
    Ok(report)
}

fn rng_country(rng: &mut Rng) -> &'static str {
    rng.pick(COUNTRIES).0
}

fn micros_to_ts(m: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_micros(m).expect("timestamp in range")
}

fn static_currency(c: &str) -> &'static str {
    catalog::FX_CURRENCIES.iter().map(|f| f.0).chain(["EUR"]).find(|s| *s == c).unwrap_or("EUR")
}

/// The largest price `price_log.price` (numeric(12,2)) holds, in cents.
const MAX_PRICE_CENTS: i64 = 999_999_999_999;

/// A listing's next price: its last one moved by `factor`, held within the column's range
/// (the hard cases start at the maximum: a rise there would fail the day's COPY).
fn next_price(cents: i64, factor: f64) -> i64 {
    (((cents as f64) * factor).round() as i64).clamp(0, MAX_PRICE_CENTS)
}

/// "123.45" at scale 2 → 12345 (the text form of a numeric with exactly that scale).
fn parse_scaled(s: &str, scale: u32) -> i64 {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let neg = int.starts_with('-');
    let int: i64 = int.trim_start_matches('-').parse().unwrap_or(0);
    let mut f = frac.to_string();
    f.truncate(scale as usize);
    while f.len() < scale as usize {
        f.push('0');
    }
    let v = int * 10i64.pow(scale) + f.parse::<i64>().unwrap_or(0);
    if neg { -v } else { v }
}

async fn load_taxonomy(c: &Client) -> Result<Taxonomy, SynthError> {
    let q = |ctx: &'static str| PgError::query(ctx);
    let makes: Vec<Make> = c
        .query("SELECT make_id, slug, name FROM makes ORDER BY make_id", &[])
        .await
        .map_err(q("reading makes"))?
        .iter()
        .map(|r| {
            let slug: String = r.get(1);
            let (weight, price_factor) = MAKES.iter().find(|m| m.0 == slug).map_or((1, 1.0), |m| (m.2, m.3));
            Make { make_id: r.get(0), slug, name: r.get(2), weight, price_factor }
        })
        .collect();
    let models: Vec<Model> = c
        .query("SELECT model_id, make_id, name, segment, body_type FROM models ORDER BY model_id", &[])
        .await
        .map_err(q("reading models"))?
        .iter()
        .map(|r| Model {
            model_id: r.get(0),
            make_id: r.get(1),
            name: r.get(2),
            segment: r.get(3),
            body_type: r.get(4),
            updated_at: 0,
        })
        .collect();
    let dealers: Vec<(i64, &'static str)> = c
        .query("SELECT dealer_id, country::text FROM dealers ORDER BY dealer_id", &[])
        .await
        .map_err(q("reading dealers"))?
        .iter()
        .filter_map(|r| {
            let country: String = r.get(1);
            catalog::country_index(&country).map(|ci| (r.get(0), COUNTRIES[ci].0))
        })
        .collect();
    Ok(Taxonomy::new(makes, models, &dealers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_numeric_text() {
        assert_eq!(parse_scaled("123.45", 2), 12_345);
        assert_eq!(parse_scaled("0.04500000", 8), 4_500_000);
        assert_eq!(parse_scaled("-1.5", 2), -150);
        assert_eq!(parse_scaled("7", 2), 700);
    }

    #[test]
    fn a_new_price_stays_within_the_column() {
        assert_eq!(next_price(MAX_PRICE_CENTS, 1.04), MAX_PRICE_CENTS);
        assert_eq!(next_price(MAX_PRICE_CENTS, 0.5), 500_000_000_000);
        assert_eq!(next_price(10_000, 0.94), 9_400);
        assert_eq!(next_price(0, 1.04), 0);
    }
}
