--! layer = "silver"
--! description = "The listing entity: current state plus the columns derived from it alone. A view: a projection is cheaper to recompute than to store."
--! key = ["listing_id"]
--! sources = ["bronze.listings"]
--! materialize = "view"
SELECT listing_id,
       country,
       make_id,
       model_id,
       dealer_id,
       fuel,
       gearbox,
       first_registration,
       -- PostgreSQL: extract(year FROM first_registration)::smallint
       CAST(extract(year FROM first_registration) AS SMALLINT) AS registration_year,
       mileage_km,
       power_kw,
       -- numeric arithmetic (1.35962 is a decimal literal), rounded half away from zero
       CAST(round(power_kw * 1.35962) AS SMALLINT) AS power_hp,
       title,
       zip,
       created_at,
       updated_at,
       deleted_at,
       deleted_at IS NULL AS is_active
FROM bronze.listings
