--! layer = "silver"
--! description = "The taxonomy: one row per model, with its make. Renames and segment moves land here."
--! key = ["model_id"]
--! sources = ["bronze.models", "bronze.makes"]
--! [incremental]
--! # A renamed or moved model, or a renamed make: those models are recomputed and merged.
--! [incremental.affects]
--! "bronze.models" = "SELECT model_id FROM changes"
--! "bronze.makes" = """
--! SELECT m.model_id FROM bronze.models m
--! JOIN (SELECT DISTINCT make_id FROM changes) c ON c.make_id = m.make_id
--! """
SELECT mo.model_id,
       mo.make_id,
       mk.slug AS make_slug,
       mo.name,
       mo.segment,
       mo.body_type,
       mo.updated_at
FROM bronze.models mo
LEFT JOIN bronze.makes mk ON mk.make_id = mo.make_id
