--! layer = "silver"
--! description = "Sellers: dealers and private sellers."
--! key = ["dealer_id"]
--! sources = ["bronze.dealers"]
--! materialize = "view"
SELECT dealer_id, country, kind, name, zip, created_at, updated_at
FROM bronze.dealers
