"""The peer for `weir-bench derive`: DuckDB (PyPI) computing ads_<slug> from the same
bronze Parquet files Weir reads, with the legacy job's SQL in DuckDB's dialect.

usage: duckdb_mart.py LAKE_DIR SLUG AS_OF_ISO RUNS
Prints one line per run: "duckdb <seconds> <rows>".
"""
import os
import sys
import time

import duckdb

lake, slug, as_of, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
b = os.path.join(lake, "bronze")


def src(table, partitioned):
    pattern = f"{b}/{table}/*/*.parquet" if partitioned else f"{b}/{table}/*.parquet"
    return f"read_parquet('{pattern}', hive_partitioning = {str(partitioned).lower()})"


MART = f"""
CREATE OR REPLACE TEMP TABLE ads AS
WITH l AS (
    SELECT l.* FROM {src('listings', True)} l
    JOIN {src('makes', False)} mk ON mk.make_id = l.make_id
    WHERE mk.slug = '{slug}'
), p AS (
    SELECT p.listing_id, p.changed_at,
           CASE WHEN p.currency = 'EUR' THEN p.price ELSE round(p.price * f.eur_per_unit, 2) END AS eur
    FROM {src('price_log', True)} p
    JOIN l ON l.listing_id = p.listing_id
    LEFT JOIN {src('fx_rates', False)} f
           ON f.currency = p.currency AND f.day = CAST(p.changed_at AS DATE)
), agg AS (
    SELECT listing_id,
           first(eur ORDER BY changed_at) AS price_first_eur,
           first(eur ORDER BY changed_at DESC) AS price_last_eur,
           min(eur) AS price_min_eur, max(eur) AS price_max_eur,
           count(*) - 1 AS price_changes,
           min(changed_at) AS first_price_at, max(changed_at) AS last_price_at
    FROM p GROUP BY listing_id
)
SELECT l.listing_id, l.country, mk.name AS make, mo.name AS model, mo.segment, mo.body_type,
       l.dealer_id, d.kind AS seller_kind, l.fuel, l.gearbox, l.first_registration,
       CAST(extract(year FROM l.first_registration) AS SMALLINT) AS registration_year,
       l.mileage_km, l.power_kw, CAST(round(l.power_kw * 1.35962) AS SMALLINT) AS power_hp,
       l.title, l.zip,
       CAST(a.price_first_eur AS DECIMAL(12,2)) AS price_first_eur,
       CAST(a.price_last_eur AS DECIMAL(12,2)) AS price_last_eur,
       CAST(a.price_min_eur AS DECIMAL(12,2)) AS price_min_eur,
       CAST(a.price_max_eur AS DECIMAL(12,2)) AS price_max_eur,
       CAST(coalesce(a.price_changes, 0) AS INTEGER) AS price_changes,
       a.first_price_at, a.last_price_at, l.created_at, l.updated_at, l.deleted_at,
       l.deleted_at IS NULL AS is_active,
       CAST(CAST(coalesce(l.deleted_at, TIMESTAMPTZ '{as_of}') AS DATE) - CAST(l.created_at AS DATE) AS INTEGER) AS days_online,
       CAST(CASE WHEN a.price_first_eur > 0
                 THEN round(100 * (a.price_first_eur - a.price_last_eur) / a.price_first_eur, 2) END AS DECIMAL(6,2)) AS price_drop_pct
FROM l
JOIN {src('makes', False)} mk ON mk.make_id = l.make_id
LEFT JOIN {src('models', False)} mo ON mo.model_id = l.model_id
LEFT JOIN {src('dealers', False)} d ON d.dealer_id = l.dealer_id
LEFT JOIN agg a ON a.listing_id = l.listing_id
"""

con = duckdb.connect()
con.execute("SET TimeZone = 'UTC'")
for _ in range(runs):
    t = time.perf_counter()
    con.execute(MART)
    rows = con.execute("SELECT count(*) FROM ads").fetchone()[0]
    print(f"duckdb {time.perf_counter() - t:.3f} {rows}", flush=True)
