--! layer = "silver"
--! description = "The price log folded once per listing, in EUR (spec: EUR value of a price_log row), partitioned by make: a one-make derive folds only that make's prices."
--! key = ["listing_id"]
--! sources = ["bronze.price_log", "bronze.fx_rates", "bronze.listings"]
--! partition = ["make_id"]
WITH p AS (
    SELECT p.listing_id,
           p.changed_at,
           -- a missing rate makes the EUR value NULL
           CASE WHEN p.currency = 'EUR' THEN p.price
                ELSE round(p.price * f.eur_per_unit, 2) END AS eur
    FROM bronze.price_log p
    LEFT JOIN bronze.fx_rates f
           ON f.currency = p.currency
          AND f.day = CAST(p.changed_at AS DATE)
)
SELECT l.make_id,
       p.listing_id,
       CAST(first_by(p.eur, p.changed_at) AS DECIMAL(12, 2)) AS price_first_eur,
       CAST(last_by(p.eur, p.changed_at) AS DECIMAL(12, 2)) AS price_last_eur,
       CAST(min(p.eur) AS DECIMAL(12, 2)) AS price_min_eur,
       CAST(max(p.eur) AS DECIMAL(12, 2)) AS price_max_eur,
       CAST(count(*) AS INT) AS price_rows,
       min(p.changed_at) AS first_price_at,
       max(p.changed_at) AS last_price_at
FROM p
JOIN bronze.listings l ON l.listing_id = p.listing_id
GROUP BY l.make_id, p.listing_id
