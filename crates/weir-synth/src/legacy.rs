//! The legacy mart pipeline: `ads_<slug>` built inside PostgreSQL with plain SQL, TRUNCATE +
//! INSERT, exactly per the spec's 30 columns. Weir's reference for parity.

use chrono::{DateTime, Utc};
use tokio_postgres::Client;
use weir_core::validate_slug;
use weir_postgres::PgError;

use crate::SynthError;

/// The mart's 30 columns, names and types in order (spec: "The mart ads_<slug>").
pub const MART_COLUMNS: &[(&str, &str)] = &[
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

/// The price log of one make, each row with its EUR value (spec: "EUR value of a price_log
/// row"), and the fold per listing. `$1` is the make slug.
const FOLD_CTES: &str = r#"
WITH l AS (
    SELECT l.*
    FROM listings l
    JOIN makes mk ON mk.make_id = l.make_id
    WHERE mk.slug = $1
), p AS (
    SELECT p.listing_id, p.changed_at,
           CASE WHEN p.currency = 'EUR' THEN p.price
                ELSE round(p.price * f.eur_per_unit, 2) END AS eur
    FROM price_log p
    JOIN l ON l.listing_id = p.listing_id
    LEFT JOIN fx_rates f
           ON f.currency = p.currency
          AND f.day = (p.changed_at AT TIME ZONE 'UTC')::date
), agg AS (
    SELECT listing_id,
           (array_agg(eur ORDER BY changed_at))[1]      AS price_first_eur,
           (array_agg(eur ORDER BY changed_at DESC))[1] AS price_last_eur,
           min(eur)        AS price_min_eur,
           max(eur)        AS price_max_eur,
           count(*) - 1    AS price_changes,
           min(changed_at) AS first_price_at,
           max(changed_at) AS last_price_at
    FROM p
    GROUP BY listing_id
)
"#;

/// The drop percentage, unrounded to the column type (`$1` slug, `$2` as_of unused here).
const DROP_PCT: &str = "CASE WHEN a.price_first_eur > 0 THEN round(100 * (a.price_first_eur - a.price_last_eur) / a.price_first_eur, 2) END";

fn mart_select() -> String {
    format!(
        r#"{FOLD_CTES}
SELECT l.listing_id,
       l.country,
       mk.name,
       mo.name,
       mo.segment,
       mo.body_type,
       l.dealer_id,
       d.kind,
       l.fuel,
       l.gearbox,
       l.first_registration,
       extract(year FROM l.first_registration)::smallint,
       l.mileage_km,
       l.power_kw,
       round(l.power_kw * 1.35962)::smallint,
       l.title,
       l.zip,
       a.price_first_eur,
       a.price_last_eur,
       a.price_min_eur,
       a.price_max_eur,
       coalesce(a.price_changes, 0)::integer,
       a.first_price_at,
       a.last_price_at,
       l.created_at,
       l.updated_at,
       l.deleted_at,
       l.deleted_at IS NULL,
       (coalesce(l.deleted_at, $2::timestamptz) AT TIME ZONE 'UTC')::date - (l.created_at AT TIME ZONE 'UTC')::date,
       {DROP_PCT}
FROM l
JOIN makes mk ON mk.make_id = l.make_id
LEFT JOIN models mo ON mo.model_id = l.model_id
LEFT JOIN dealers d ON d.dealer_id = l.dealer_id
LEFT JOIN agg a ON a.listing_id = l.listing_id"#
    )
}

pub fn mart_table(slug: &str) -> Result<String, SynthError> {
    Ok(format!("ads_{}", validate_slug(slug)?))
}

fn create_table_sql(table: &str) -> String {
    let cols: Vec<String> = MART_COLUMNS
        .iter()
        .map(|(n, t)| if *n == "listing_id" { format!("    {n} {t} PRIMARY KEY") } else { format!("    {n} {t}") })
        .collect();
    format!("CREATE TABLE IF NOT EXISTS \"{table}\" (\n{}\n)", cols.join(",\n"))
}

#[derive(Debug, Clone)]
pub struct LegacyReport {
    pub table: String,
    pub rows: u64,
}

/// All make slugs, in make_id order.
pub async fn list_make_slugs(client: &Client) -> Result<Vec<String>, SynthError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('public.makes') IS NOT NULL", &[])
        .await
        .map_err(PgError::query("looking for table makes"))?
        .get(0);
    if !exists {
        return Err(SynthError::NoMarketplace("makes".to_string()));
    }
    Ok(client
        .query("SELECT slug FROM makes ORDER BY make_id", &[])
        .await
        .map_err(PgError::query("reading makes"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Builds `ads_<slug>` as of `as_of`: CREATE IF NOT EXISTS, TRUNCATE, INSERT, in one
/// transaction (readers see the old or the new mart, never half of one).
pub async fn build_legacy_mart(
    client: &mut Client,
    slug: &str,
    as_of: DateTime<Utc>,
) -> Result<LegacyReport, SynthError> {
    let table = mart_table(slug)?;
    let known = list_make_slugs(client).await?;
    if !known.iter().any(|s| s == slug) {
        return Err(SynthError::UnknownMake { slug: slug.to_string(), known: known.join(", ") });
    }
    let tx = client.transaction().await.map_err(PgError::query("BEGIN"))?;
    tx.batch_execute(&format!("{};\nTRUNCATE \"{table}\"", create_table_sql(&table)))
        .await
        .map_err(PgError::query(format!("preparing {table}")))?;
    let insert = format!("INSERT INTO \"{table}\"\n{}", mart_select());
    let rows = match tx.execute(&insert, &[&slug, &as_of]).await {
        Ok(n) => n,
        Err(e) => {
            let err = PgError::Query { context: format!("building {table}"), source: e };
            drop(tx);
            if err.sqlstate() == Some("22003")
                && let Some(overflow) = find_drop_pct_overflow(client, slug, &table).await?
            {
                return Err(overflow);
            }
            return Err(err.into());
        }
    };
    tx.batch_execute(&format!(
        "COMMENT ON TABLE \"{table}\" IS 'weir legacy build; make={slug}; as_of={}'",
        as_of.format("%Y-%m-%dT%H:%M:%S%.6fZ")
    ))
    .await
    .map_err(PgError::query(format!("commenting {table}")))?;
    tx.commit().await.map_err(PgError::query(format!("committing {table}")))?;
    Ok(LegacyReport { table, rows })
}

/// After a numeric overflow: the first listing whose price_drop_pct does not fit numeric(6,2).
async fn find_drop_pct_overflow(client: &Client, slug: &str, table: &str) -> Result<Option<SynthError>, SynthError> {
    let sql = format!(
        "{FOLD_CTES} SELECT a.listing_id, ({DROP_PCT})::text FROM agg a WHERE abs({DROP_PCT}) >= 10000 ORDER BY a.listing_id LIMIT 1"
    );
    let row = client.query_opt(&sql, &[&slug]).await.map_err(PgError::query("finding the overflowing listing"))?;
    Ok(row.map(|r| SynthError::DropPctOverflow { table: table.to_string(), listing_id: r.get(0), value: r.get(1) }))
}
