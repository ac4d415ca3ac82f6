--! layer = "silver"
--! description = "The stored rows of every mart ads_<slug>, one partition per make: every column but the taxonomy's (model, segment, body_type), which the view gold.ads_<slug> joins at read time, with the model_id to join on."
--! key = ["listing_id"]
--! sources = ["silver.listing", "silver.listing_price", "silver.dealer", "bronze.makes"]
--! partition = ["make_id"]
--! # Read by key (the FDW's and Flight's lookups): in key order within each make's partition.
--! lookup = true
--! [incremental]
--! # A row is its listing joined with the listing's folded prices, seller and make:
--! # the listings a change reaches are recomputed (their listing and price rows read alone),
--! # the rest of the marts stay as they are, file by file. Every make's changed rows are
--! # recomputed by one query and merged in one commit.
--! keyed = ["silver.listing", "silver.listing_price"]
--! [incremental.affects]
--! "bronze.listings" = "SELECT listing_id FROM changes"
--! "silver.listing_price" = "SELECT listing_id FROM changes"
--! "bronze.dealers" = """
--! SELECT l.listing_id FROM bronze.listings l
--! JOIN (SELECT DISTINCT dealer_id FROM changes) c ON c.dealer_id = l.dealer_id
--! """
--! "bronze.makes" = """
--! SELECT l.listing_id FROM bronze.listings l
--! JOIN (SELECT DISTINCT make_id FROM changes) c ON c.make_id = l.make_id
--! """
SELECT l.listing_id,
       l.make_id,
       l.country,
       mk.name AS make,
       l.model_id,
       l.dealer_id,
       d.kind AS seller_kind,
       l.fuel,
       l.gearbox,
       l.first_registration,
       l.registration_year,
       l.mileage_km,
       l.power_kw,
       l.power_hp,
       l.title,
       l.zip,
       p.price_first_eur,
       p.price_last_eur,
       p.price_min_eur,
       p.price_max_eur,
       CAST(coalesce(p.price_rows - 1, 0) AS INT) AS price_changes,
       p.first_price_at,
       p.last_price_at,
       l.created_at,
       l.updated_at,
       l.deleted_at,
       l.is_active,
       -- UTC calendar days: (coalesce(deleted_at, as_of) AT TIME ZONE 'UTC')::date - (created_at AT TIME ZONE 'UTC')::date;
       -- only the as-of's date is read, so a later as-of on the same day changes no row
       CAST(CAST(coalesce(CAST(l.deleted_at AS DATE), ${as_of_date}) AS INT)
            - CAST(CAST(l.created_at AS DATE) AS INT) AS INT) AS days_online,
       -- PostgreSQL numeric division (pg_div), round half away from zero; must fit numeric(6,2)
       fit_numeric(CASE WHEN p.price_first_eur > 0
                        THEN round(100 * (p.price_first_eur - p.price_last_eur) / p.price_first_eur, 2) END,
                   6, 2, 'price_drop_pct of listing_id', l.listing_id) AS price_drop_pct
FROM silver.listing l
JOIN bronze.makes mk ON mk.make_id = l.make_id
LEFT JOIN silver.dealer d ON d.dealer_id = l.dealer_id
LEFT JOIN silver.listing_price p ON p.listing_id = l.listing_id AND p.make_id = l.make_id
