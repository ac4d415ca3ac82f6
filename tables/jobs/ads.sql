--! layer = "gold"
--! description = "The mart ads_<slug>: one row per listing of the make, the legacy mart's 30 columns. A view: the make's stored rows (its partition of silver.ads_base) with the taxonomy joined at read time, so that a renamed or moved model rewrites no mart row."
--! key = ["listing_id"]
--! sources = ["silver.ads_base", "silver.model"]
--! materialize = "view"
--! per = "make"
-- silver.ads_base, the make's partition (${make_id}: the slug's make_id, a literal that
-- prunes the other makes' files); silver.model: ~1,500 models, joined in a few milliseconds
-- when the mart is read, and filters on listing_id still reach the stored rows' files.
SELECT a.listing_id,
       a.country,
       a.make,
       mo.name AS model,
       mo.segment,
       mo.body_type,
       a.dealer_id,
       a.seller_kind,
       a.fuel,
       a.gearbox,
       a.first_registration,
       a.registration_year,
       a.mileage_km,
       a.power_kw,
       a.power_hp,
       a.title,
       a.zip,
       a.price_first_eur,
       a.price_last_eur,
       a.price_min_eur,
       a.price_max_eur,
       a.price_changes,
       a.first_price_at,
       a.last_price_at,
       a.created_at,
       a.updated_at,
       a.deleted_at,
       a.is_active,
       a.days_online,
       a.price_drop_pct
FROM silver.ads_base a
LEFT JOIN silver.model mo ON mo.model_id = a.model_id
WHERE a.make_id = ${make_id}
