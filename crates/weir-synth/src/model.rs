//! Rows of the source marketplace and how they are drawn. Pure functions of the seed: no I/O.

use crate::catalog::{self, COUNTRIES, MAKES, SEGMENTS};
use crate::rng::Rng;

pub const MICROS_PER_DAY: i64 = 86_400_000_000;
/// 2024-07-01T00:00:00Z: the generated history starts here.
pub const HISTORY_START: i64 = 1_719_792_000_000_000;
/// 2026-07-01T00:00:00Z: the generated history ends here (exclusive); a good `--as-of`.
pub const HISTORY_END: i64 = 1_782_864_000_000_000;

pub fn unix_day(micros: i64) -> i32 {
    micros.div_euclid(MICROS_PER_DAY) as i32
}

#[derive(Debug, Clone, PartialEq)]
pub struct Make {
    pub make_id: i16,
    pub slug: String,
    pub name: String,
    pub weight: u32,
    pub price_factor: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub model_id: i32,
    pub make_id: i16,
    pub name: String,
    pub segment: String,
    pub body_type: String,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Dealer {
    pub dealer_id: i64,
    pub country: &'static str,
    pub kind: &'static str,
    pub name: String,
    pub zip: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listing {
    pub listing_id: i64,
    pub country: &'static str,
    pub make_id: i16,
    pub model_id: i32,
    pub dealer_id: i64,
    pub title: String,
    pub fuel: &'static str,
    pub gearbox: &'static str,
    /// Days since 1970-01-01.
    pub first_registration: Option<i32>,
    pub mileage_km: Option<i32>,
    pub power_kw: Option<i16>,
    pub color: Option<String>,
    pub zip: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub deleted_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Price {
    pub listing_id: i64,
    pub changed_at: i64,
    /// numeric(12,2) as hundredths.
    pub cents: i64,
    pub currency: &'static str,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Fx {
    pub currency: &'static str,
    pub day: i32,
    /// numeric(18,8) as 1e-8 units.
    pub rate_e8: i64,
}

/// What a listing is drawn from: the taxonomy and the dealers.
#[derive(Debug, Clone)]
pub struct Taxonomy {
    pub makes: Vec<Make>,
    pub models: Vec<Model>,
    /// Model indexes per make index.
    pub models_by_make: Vec<Vec<usize>>,
    /// Dealer ids per country index (COUNTRIES order).
    pub dealers_by_country: Vec<Vec<i64>>,
}

impl Taxonomy {
    pub fn new(makes: Vec<Make>, models: Vec<Model>, dealers: &[(i64, &'static str)]) -> Self {
        let mut models_by_make = vec![Vec::new(); makes.len()];
        for (i, m) in models.iter().enumerate() {
            if let Some(mi) = makes.iter().position(|mk| mk.make_id == m.make_id) {
                models_by_make[mi].push(i);
            }
        }
        let mut dealers_by_country = vec![Vec::new(); COUNTRIES.len()];
        for (id, country) in dealers {
            if let Some(ci) = catalog::country_index(country) {
                dealers_by_country[ci].push(*id);
            }
        }
        Self { makes, models, models_by_make, dealers_by_country }
    }

    pub fn make_index(&self, slug: &str) -> Option<usize> {
        self.makes.iter().position(|m| m.slug == slug)
    }
}

pub fn gen_makes() -> Vec<Make> {
    MAKES
        .iter()
        .enumerate()
        .map(|(i, (slug, name, weight, factor))| Make {
            make_id: i as i16 + 1,
            slug: (*slug).to_string(),
            name: (*name).to_string(),
            weight: *weight,
            price_factor: *factor,
        })
        .collect()
}

pub fn gen_models(seed: u64, makes: &[Make]) -> Vec<Model> {
    let total_weight: u32 = makes.iter().map(|m| m.weight).sum();
    let spare = catalog::TARGET_MODELS.saturating_sub(12 * makes.len());
    let mut models = Vec::with_capacity(catalog::TARGET_MODELS + makes.len());
    for make in makes {
        let mut rng = Rng::derive(seed, 10, make.make_id as u64);
        let count = 12 + (f64::from(make.weight) / f64::from(total_weight) * spare as f64).round() as usize;
        let mut names = std::collections::HashSet::new();
        while names.len() < count {
            let stem = format!(
                "{}{}{}",
                rng.pick(catalog::NAME_SYLLABLES),
                rng.pick(catalog::NAME_SYLLABLES).to_lowercase(),
                rng.pick(catalog::NAME_ENDINGS)
            );
            let name = format!("{stem}{}", rng.pick(catalog::MODEL_VARIANTS));
            if names.insert(name.clone()) {
                let (segment, _, _) = *rng.pick(SEGMENTS);
                models.push(Model {
                    model_id: models.len() as i32 + 1,
                    make_id: make.make_id,
                    name,
                    segment: segment.to_string(),
                    body_type: rng.pick(catalog::BODY_TYPES).to_string(),
                    updated_at: HISTORY_START - rng.range(0, 900) * MICROS_PER_DAY - rng.range(0, MICROS_PER_DAY - 1),
                });
            }
        }
    }
    models
}

pub fn dealer_count(listings: u64) -> u64 {
    (listings / 50).max(30)
}

pub fn gen_dealer(seed: u64, dealer_id: i64) -> Dealer {
    let mut rng = Rng::derive(seed, 20, dealer_id as u64);
    // The first 15 dealers cover every country once; the rest follow the listing weights.
    let ci = if (1..=COUNTRIES.len() as i64).contains(&dealer_id) {
        dealer_id as usize - 1
    } else {
        rng.weighted(&COUNTRIES.iter().map(|c| c.2).collect::<Vec<_>>())
    };
    let country = COUNTRIES[ci].0;
    let kind = if rng.chance(0.75) { "dealer" } else { "private" };
    let surname = rng.pick(catalog::SURNAMES);
    let name = if kind == "dealer" {
        format!("{} {}", rng.pick(catalog::DEALER_WORDS), surname)
    } else {
        format!("{}. {surname}", (b'A' + rng.below(26) as u8) as char)
    };
    let zip = (!rng.chance(0.05)).then(|| gen_zip(&mut rng, country));
    let created_at = HISTORY_START - rng.range(0, 3 * 365) * MICROS_PER_DAY - rng.range(0, MICROS_PER_DAY - 1);
    let updated_at = created_at + rng.range(0, 365) * MICROS_PER_DAY;
    Dealer { dealer_id, country, kind, name, zip, created_at, updated_at }
}

pub fn gen_zip(rng: &mut Rng, country: &str) -> String {
    let d = |rng: &mut Rng, n: u32| format!("{:0width$}", rng.below(10u64.pow(n)), width = n as usize);
    match country {
        "CZ" | "SE" => format!("{} {}", d(rng, 3), d(rng, 2)),
        "NL" => {
            format!("{} {}{}", d(rng, 4), (b'A' + rng.below(26) as u8) as char, (b'A' + rng.below(26) as u8) as char)
        }
        "PL" => format!("{}-{}", d(rng, 2), d(rng, 3)),
        "LU" => format!("L-{}", d(rng, 4)),
        "RO" => d(rng, 6),
        "AT" | "BE" | "DK" | "HU" | "CH" => d(rng, 4),
        _ => d(rng, 5),
    }
}

/// How a listing's life is placed in time.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// created_at is drawn from [start, end).
    pub start: i64,
    pub end: i64,
    /// Listings may be deleted and prices change until here (exclusive).
    pub horizon: i64,
    /// Share of listings deleted before the horizon.
    pub deleted_share: f64,
    /// Number of price rows: 0 with `no_price_share`, else uniform in `prices`.
    pub prices: (i64, i64),
    pub no_price_share: f64,
}

impl Window {
    pub fn history() -> Self {
        Self {
            start: HISTORY_START,
            end: HISTORY_END - MICROS_PER_DAY,
            horizon: HISTORY_END,
            deleted_share: 0.25,
            prices: (5, 15),
            no_price_share: 0.01,
        }
    }
}

/// Draws one listing and its price history.
pub fn gen_listing(seed: u64, listing_id: i64, tax: &Taxonomy, w: &Window) -> (Listing, Vec<Price>) {
    let mut rng = Rng::derive(seed, 30, listing_id as u64);
    let ci = rng.weighted(&COUNTRIES.iter().map(|c| c.2).collect::<Vec<_>>());
    let country = COUNTRIES[ci].0;
    let mi = rng.weighted(&tax.makes.iter().map(|m| m.weight).collect::<Vec<_>>());
    let make = &tax.makes[mi];
    let model = &tax.models[*rng.pick(&tax.models_by_make[mi])];
    let dealers = &tax.dealers_by_country[ci];
    let dealer_id = *rng.pick(dealers);
    let seg = SEGMENTS.iter().find(|s| s.0 == model.segment).copied().unwrap_or(SEGMENTS[2]);

    let electric_make = matches!(make.slug.as_str(), "tesla" | "polestar");
    let fuel = if electric_make {
        "electric"
    } else {
        catalog::FUELS[rng.weighted(&catalog::FUELS.iter().map(|f| f.1).collect::<Vec<_>>())].0
    };
    let gearbox = if fuel == "electric" || rng.chance(0.45) { "automatic" } else { "manual" };
    let created_at = rng.range(w.start, w.end - 1);
    let age_days = rng.range(0, 15 * 365);
    let first_registration = (!rng.chance(0.03)).then(|| unix_day(created_at) - age_days as i32);
    let mileage_km = (!rng.chance(0.02))
        .then(|| (age_days as f64 / 365.0 * rng.range(5_000, 25_000) as f64) as i32 + rng.range(0, 500) as i32);
    let power_kw = (!rng.chance(0.03)).then(|| (seg.2 as f64 * (0.6 + rng.unit() * 0.9)) as i16);
    let color = if rng.chance(0.08) {
        None
    } else if rng.chance(0.02) {
        Some(String::new())
    } else {
        Some(rng.pick(catalog::COLORS).to_string())
    };
    let zip = if rng.chance(0.04) {
        None
    } else if rng.chance(0.01) {
        Some(String::new())
    } else {
        Some(gen_zip(&mut rng, country))
    };
    let mut title = format!("{} {} {}", make.name, model.name, catalog::engine_label(fuel, power_kw));
    if rng.chance(0.6) {
        title.push_str(catalog::TITLE_EXTRAS[rng.below(4) as usize]);
    }
    if rng.chance(0.12) {
        let extra: &&str = rng.pick(catalog::TITLE_EXTRAS);
        title.push_str(extra);
    }
    let deleted_at = rng
        .chance(w.deleted_share)
        .then(|| rng.range(created_at + 3_600_000_000, w.horizon - 1))
        .filter(|d| *d < w.horizon);
    let updated_at = deleted_at.unwrap_or_else(|| rng.range(created_at, w.horizon - 1));
    let listing = Listing {
        listing_id,
        country,
        make_id: make.make_id,
        model_id: model.model_id,
        dealer_id,
        title,
        fuel,
        gearbox,
        first_registration,
        mileage_km,
        power_kw,
        color,
        zip,
        created_at,
        updated_at,
        deleted_at,
    };

    let n = if rng.chance(w.no_price_share) { 0 } else { rng.range(w.prices.0, w.prices.1) as usize };
    let age_factor = 1.25 - (age_days as f64 / (15.0 * 365.0));
    let eur = seg.1 * make.price_factor * age_factor * (0.7 + rng.unit() * 0.6);
    let currency = catalog::currency_of(country);
    let end = deleted_at.unwrap_or(w.horizon);
    let prices = gen_price_path(&mut rng, listing_id, created_at, end, n, eur, currency);
    (listing, prices)
}

/// `n` price rows between `start` and `end`, drifting mostly downwards from `eur`; a few
/// non-euro listings switch to EUR on the way. Every value stays within a factor of 10.
pub fn gen_price_path(
    rng: &mut Rng,
    listing_id: i64,
    start: i64,
    end: i64,
    n: usize,
    eur: f64,
    currency: &'static str,
) -> Vec<Price> {
    let mut times: Vec<i64> = (0..n)
        .map(|i| {
            if i == 0 {
                start + rng.range(0, 3_600_000_000).min(end - start - 1).max(0)
            } else {
                rng.range(start, end - 1)
            }
        })
        .collect();
    times.sort_unstable();
    for i in 1..times.len() {
        if times[i] <= times[i - 1] {
            times[i] = times[i - 1] + 1;
        }
    }
    let switch_at = (currency != "EUR" && n > 2 && rng.chance(0.02)).then(|| rng.range(1, n as i64 - 1) as usize);
    let mut value = eur;
    let mut out = Vec::with_capacity(n);
    for (i, t) in times.into_iter().enumerate() {
        if i > 0 {
            value *= if rng.chance(0.8) { 1.0 - rng.unit() * 0.06 } else { 1.0 + rng.unit() * 0.04 };
        }
        let cur = if switch_at.is_some_and(|s| i >= s) { "EUR" } else { currency };
        out.push(Price { listing_id, changed_at: t, cents: local_cents(rng, value, cur), currency: cur });
    }
    out
}

/// A seller's price in the local currency, rounded the way sellers round.
fn local_cents(rng: &mut Rng, eur: f64, currency: &str) -> i64 {
    let local = eur / catalog::approx_eur_rate(currency);
    let unit = match currency {
        "CZK" | "SEK" => 1000.0,
        "HUF" => 10_000.0,
        "DKK" | "PLN" | "CHF" => 100.0,
        "RON" => 50.0,
        _ => 10.0,
    };
    let whole = ((local / unit).round() * unit).max(unit) as i64;
    match rng.below(10) {
        0 => whole * 100 - 1,        // 12,999.99
        1 => whole * 100 - 50,       // 12,999.50
        2 => (local * 100.0) as i64, // exact cents
        _ => whole * 100,
    }
}

/// Daily EUR rates for every non-euro currency from `from_day` to `to_day` (inclusive), a
/// deterministic random walk.
pub fn gen_fx(seed: u64, from_day: i32, to_day: i32) -> Vec<Fx> {
    let mut out = Vec::new();
    for (ci, (currency, base)) in catalog::FX_CURRENCIES.iter().enumerate() {
        let mut rng = Rng::derive(seed, 40, ci as u64);
        let mut rate = *base;
        for day in from_day..=to_day {
            rate *= 1.0 + (rng.unit() - 0.5) * 0.006;
            rate = rate.clamp(base * 0.8, base * 1.2);
            let rate_e8 = crate::hard::forced_rate(currency, day).unwrap_or((rate * 1e8).round() as i64);
            out.push(Fx { currency, day, rate_e8 });
        }
    }
    out
}
