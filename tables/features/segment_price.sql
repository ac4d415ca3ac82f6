--! layer = "gold"
--! description = "Median last EUR price of the active listings per country and segment, one version per change: the denominator of the segment-and-country price ratio, kept apart so a moving median does not version every listing."
--! key = ["country", "segment"]
--! sources = ["silver.listing", "silver.listing_price", "silver.model"]
--! materialize = "history"
SELECT l.country,
       mo.segment,
       CAST(median(p.price_last_eur) AS DECIMAL(12, 2)) AS median_price_eur,
       CAST(count(*) AS BIGINT) AS listings
FROM silver.listing l
JOIN silver.model mo ON mo.model_id = l.model_id
JOIN silver.listing_price p ON p.listing_id = l.listing_id
WHERE l.is_active AND p.price_last_eur IS NOT NULL AND mo.segment IS NOT NULL
GROUP BY l.country, mo.segment
