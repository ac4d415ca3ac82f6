--! layer = "gold"
--! description = "Per-listing ML features, one version per change (valid_from/valid_to, added by the history materialization). What depends on the reading instant (vehicle age, days online, the segment median ratio) is computed at retrieval from these columns."
--! key = ["listing_id"]
--! sources = ["silver.listing", "silver.listing_price", "silver.model", "silver.dealer", "bronze.makes"]
--! materialize = "history"
SELECT l.listing_id,
       l.country,
       mk.slug AS make,
       mo.name AS model,
       mo.segment,
       l.is_active,
       d.kind AS seller_kind,
       l.fuel,
       l.gearbox,
       l.title,
       l.first_registration,
       l.created_at,
       l.deleted_at,
       l.mileage_km,
       l.power_kw,
       p.price_last_eur,
       ln(CAST(p.price_last_eur AS DOUBLE)) AS log_price,
       -- float arithmetic (a literal like 1000.0 would be numeric, and its division PostgreSQL's)
       CASE WHEN l.mileage_km > 0
            THEN CAST(p.price_last_eur AS DOUBLE) * 1000 / CAST(l.mileage_km AS DOUBLE) END AS price_per_1000km,
       CAST(coalesce(p.price_rows - 1, 0) AS INT) AS price_changes,
       -- the mart's formula: PostgreSQL numeric division, half away from zero
       fit_numeric(CASE WHEN p.price_first_eur > 0
                        THEN round(100 * (p.price_first_eur - p.price_last_eur) / p.price_first_eur, 2) END,
                   6, 2, 'price_drop_pct of listing_id', l.listing_id) AS price_drop_pct
FROM silver.listing l
JOIN bronze.makes mk ON mk.make_id = l.make_id
LEFT JOIN silver.model mo ON mo.model_id = l.model_id
LEFT JOIN silver.dealer d ON d.dealer_id = l.dealer_id
LEFT JOIN silver.listing_price p ON p.listing_id = l.listing_id
