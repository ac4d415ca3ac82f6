--! layer = "silver"
--! description = "The taxonomy: one row per model, with its make. Renames and segment moves land here."
--! key = ["model_id"]
--! sources = ["bronze.models", "bronze.makes"]
SELECT mo.model_id,
       mo.make_id,
       mk.slug AS make_slug,
       mo.name,
       mo.segment,
       mo.body_type,
       mo.updated_at
FROM bronze.models mo
LEFT JOIN bronze.makes mk ON mk.make_id = mo.make_id
