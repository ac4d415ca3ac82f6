//! The source schema (../shared/spec/source-and-mart.md) and the COPY encoding of its rows.

use weir_postgres::CopyBinaryWriter;

use crate::model::{Dealer, Fx, Listing, Make, Model, Price};

/// Source tables in dependency order.
pub const SOURCE_TABLES: &[&str] = &["makes", "models", "dealers", "listings", "price_log", "fx_rates"];

/// Tables as created before loading; keys on the big tables are added after the load.
pub const CREATE_TABLES: &str = r#"
CREATE TABLE makes (
    make_id smallint PRIMARY KEY,
    slug text NOT NULL UNIQUE,
    name text NOT NULL
);
CREATE TABLE models (
    model_id integer PRIMARY KEY,
    make_id smallint NOT NULL REFERENCES makes (make_id),
    name text NOT NULL,
    segment text NOT NULL,
    body_type text NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE TABLE dealers (
    dealer_id bigint PRIMARY KEY,
    country char(2) NOT NULL,
    kind text NOT NULL CHECK (kind IN ('dealer', 'private')),
    name text NOT NULL,
    zip text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE TABLE listings (
    listing_id bigint NOT NULL,
    country char(2) NOT NULL,
    make_id smallint NOT NULL,
    model_id integer NOT NULL,
    dealer_id bigint NOT NULL,
    title text NOT NULL,
    fuel text NOT NULL,
    gearbox text NOT NULL,
    first_registration date,
    mileage_km integer,
    power_kw smallint,
    color text,
    zip text,
    price_first numeric(12,2),
    price_last numeric(12,2),
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    deleted_at timestamptz
);
CREATE TABLE price_log (
    listing_id bigint NOT NULL,
    changed_at timestamptz NOT NULL,
    price numeric(12,2) NOT NULL,
    currency char(3) NOT NULL
);
CREATE TABLE fx_rates (
    currency char(3) NOT NULL,
    day date NOT NULL,
    eur_per_unit numeric(18,8) NOT NULL
);
"#;

/// Keys and indexes added after the bulk load, one statement per connection-sized unit.
pub const ADD_KEYS: &[&str] = &[
    "ALTER TABLE price_log ADD PRIMARY KEY (listing_id, changed_at)",
    "ALTER TABLE listings ADD PRIMARY KEY (listing_id); CREATE INDEX listings_make_id ON listings (make_id); ALTER TABLE fx_rates ADD PRIMARY KEY (currency, day)",
];

pub fn encode_make(w: &mut CopyBinaryWriter, m: &Make) {
    w.row(3).i16(m.make_id).text(&m.slug).text(&m.name);
}

pub fn encode_model(w: &mut CopyBinaryWriter, m: &Model) {
    w.row(6)
        .i32(m.model_id)
        .i16(m.make_id)
        .text(&m.name)
        .text(&m.segment)
        .text(&m.body_type)
        .timestamptz_unix_micros(m.updated_at);
}

pub fn encode_dealer(w: &mut CopyBinaryWriter, d: &Dealer) {
    w.row(7).i64(d.dealer_id).text(d.country).text(d.kind).text(&d.name);
    opt_text(w, d.zip.as_deref());
    w.timestamptz_unix_micros(d.created_at).timestamptz_unix_micros(d.updated_at);
}

pub fn encode_listing(w: &mut CopyBinaryWriter, l: &Listing) {
    w.row(18)
        .i64(l.listing_id)
        .text(l.country)
        .i16(l.make_id)
        .i32(l.model_id)
        .i64(l.dealer_id)
        .text(&l.title)
        .text(l.fuel)
        .text(l.gearbox);
    match l.first_registration {
        Some(d) => w.date_unix_days(d),
        None => w.null(),
    };
    match l.mileage_km {
        Some(v) => w.i32(v),
        None => w.null(),
    };
    match l.power_kw {
        Some(v) => w.i16(v),
        None => w.null(),
    };
    opt_text(w, l.color.as_deref());
    opt_text(w, l.zip.as_deref());
    // price_first / price_last: always NULL, the upstream bug the price-log scan works around.
    w.null().null();
    w.timestamptz_unix_micros(l.created_at).timestamptz_unix_micros(l.updated_at);
    match l.deleted_at {
        Some(t) => w.timestamptz_unix_micros(t),
        None => w.null(),
    };
}

pub fn encode_price(w: &mut CopyBinaryWriter, p: &Price) {
    w.row(4).i64(p.listing_id).timestamptz_unix_micros(p.changed_at).numeric(i128::from(p.cents), 2).text(p.currency);
}

pub fn encode_fx(w: &mut CopyBinaryWriter, f: &Fx) {
    w.row(3).text(f.currency).date_unix_days(f.day).numeric(i128::from(f.rate_e8), 8);
}

fn opt_text(w: &mut CopyBinaryWriter, v: Option<&str>) {
    match v {
        Some(s) => w.text(s),
        None => w.null(),
    };
}
