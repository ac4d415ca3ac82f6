//! The catalog `weir serve` answers from: every Delta table under `<lake>/{bronze,silver,gold}`
//! and the view jobs of `tables/jobs`, refreshed at most every `refresh` so that new Delta
//! versions become visible without a restart.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{CatalogProvider, TableProvider};
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use weir_derive::{Jobs, Materialize};
use weir_lake::{LAYERS, Lake};

use crate::ServeError;

const MAKE_ID: &str = weir_derive::session::MAKE_ID;

/// The schema of the Lance datasets (`vectors.listings`).
pub const VECTORS: &str = "vectors";

/// One table or view as listed by GetTables.
#[derive(Debug, Clone)]
pub struct Entry {
    pub schema: String,
    pub name: String,
    pub kind: &'static str,
    pub arrow_schema: SchemaRef,
}

struct Snapshot {
    taken: Instant,
    tables: Vec<(String, String, DeltaTable, Arc<dyn TableProvider>)>,
    /// Lance datasets under `vectors/`, by name (`listings`).
    vectors: Vec<(String, Arc<dyn TableProvider>)>,
    /// Tables and planned views, shared by every query's session until the next refresh.
    catalog: Arc<dyn CatalogProvider>,
    /// The views planned into `catalog`, as (layer, name): `silver.listing`, `gold.ads_vw`.
    views: Vec<(String, String)>,
}

pub struct Catalog {
    lake: Lake,
    jobs: Jobs,
    refresh: Duration,
    memory_limit: usize,
    snapshot: tokio::sync::Mutex<Option<Arc<Snapshot>>>,
    /// The small tables views join, in memory, with the version they hold (see
    /// [`Catalog::hold_dimensions`]).
    dimensions: tokio::sync::Mutex<std::collections::HashMap<String, (i64, Arc<datafusion::datasource::MemTable>)>>,
}

/// The largest stored table (in Parquet bytes) a view's join is served from memory.
const DIMENSION_BYTES: i64 = 16 << 20;

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").field("lake", &self.lake).field("refresh", &self.refresh).finish()
    }
}

impl Catalog {
    pub fn new(lake: Lake, jobs: Jobs, refresh: Duration, memory_limit: usize) -> Self {
        Catalog {
            lake,
            jobs,
            refresh,
            memory_limit,
            snapshot: tokio::sync::Mutex::new(None),
            dimensions: Default::default(),
        }
    }

    pub fn lake(&self) -> &Lake {
        &self.lake
    }

    pub fn memory_limit(&self) -> usize {
        self.memory_limit
    }

    /// The tables as of now (re-read when older than the refresh interval).
    async fn snapshot(&self) -> Result<Arc<Snapshot>, ServeError> {
        let mut guard = self.snapshot.lock().await;
        if let Some(s) = guard.as_ref()
            && s.taken.elapsed() < self.refresh
        {
            return Ok(s.clone());
        }
        let ctx = weir_derive::session::session_context().map_err(|e| ServeError::Lake(e.to_string()))?;
        let mut tables = Vec::new();
        for layer in LAYERS {
            for name in self.lake.table_names(layer).await.map_err(|e| ServeError::Lake(e.to_string()))? {
                let rel = format!("{layer}/{name}");
                let table =
                    weir_lake::open_table(&self.lake, &rel).await.map_err(|e| ServeError::Lake(e.to_string()))?;
                if table.version().is_none() {
                    continue;
                }
                let provider = weir_derive::session::provider(&ctx, &table, &rel)
                    .await
                    .map_err(|e| ServeError::Lake(format!("{rel}: {e}")))?;
                tables.push((layer.to_string(), name, table, provider));
            }
        }
        let mut vectors: Vec<(String, Arc<dyn TableProvider>)> = Vec::new();
        if let Some(ds) = weir_ml::vectors::open(&self.lake).await.map_err(|e| ServeError::Lake(e.to_string()))? {
            let provider = lance::datafusion::LanceTableProvider::new(Arc::new(ds), false, false);
            vectors.push(("listings".to_string(), Arc::new(provider)));
        }
        let (catalog, views) = self.build_catalog(&tables, &vectors).await?;
        let snap = Arc::new(Snapshot { taken: Instant::now(), tables, vectors, catalog, views });
        *guard = Some(snap.clone());
        Ok(snap)
    }

    /// The `weir` catalog for a set of tables: `layer.name`, gold also under bare names, and
    /// the view jobs planned over them (a per-make view once per make whose stored rows are
    /// there: `gold.ads_vw` over `silver.ads_base_vw`).
    async fn build_catalog(
        &self,
        tables: &[(String, String, DeltaTable, Arc<dyn TableProvider>)],
        vectors: &[(String, Arc<dyn TableProvider>)],
    ) -> Result<(Arc<dyn CatalogProvider>, Vec<(String, String)>), ServeError> {
        let ctx = weir_derive::session::session_context().map_err(|e| ServeError::Lake(e.to_string()))?;
        if let Some(c) = ctx.catalog(weir_derive::session::CATALOG) {
            c.register_schema(VECTORS, Arc::new(datafusion::catalog::MemorySchemaProvider::new()))?;
        }
        for (name, provider) in vectors {
            ctx.register_table(format!("{VECTORS}.{name}").as_str(), provider.clone())?;
        }
        for (layer, name, table, provider) in tables {
            table.update_datafusion_session(&ctx.state()).map_err(|e| ServeError::Lake(e.to_string()))?;
            ctx.register_table(format!("{layer}.{name}").as_str(), provider.clone())?;
            if layer == "gold" {
                ctx.register_table(name.as_str(), provider.clone())?;
            }
        }
        self.hold_dimensions(&ctx, tables).await?;
        let mut views = Vec::new();
        let per_make_views = self.jobs.ordered.iter().any(|j| j.materialize == Materialize::View && j.per.is_some());
        let makes = match per_make_views {
            true => self.stored_makes(&ctx, tables).await?,
            false => Vec::new(),
        };
        for job in self.jobs.ordered.iter().filter(|j| j.materialize == Materialize::View) {
            let slugs: Vec<Option<(&str, i64)>> = match job.per {
                None => vec![None],
                // The makes whose stored rows the view reads are in the lake.
                Some(_) => makes
                    .iter()
                    .filter(|(_, _, lacking)| !job.sources.iter().any(|s| lacking.contains(s)))
                    .map(|(slug, id, _)| Some((slug.as_str(), *id)))
                    .collect(),
            };
            for make in slugs {
                let out = job.output(make.map(|m| m.0));
                // A view whose sources are not all in the lake yet is left out.
                let Ok(df) = ctx.sql(&job.expand_view(make)).await else { continue };
                // The job's view wins over a table left under its name by an older definition.
                let view = df.into_view();
                ctx.deregister_table(out.as_str())?;
                ctx.register_table(out.as_str(), view.clone())?;
                let (layer, name) = out.split_once('.').unwrap_or(("gold", &out));
                if layer == "gold" {
                    ctx.deregister_table(name)?;
                    ctx.register_table(name, view)?;
                }
                views.push((layer.to_string(), name.to_string()));
            }
        }
        let catalog =
            ctx.catalog(weir_derive::session::CATALOG).ok_or_else(|| ServeError::Lake("no catalog".into()))?;
        Ok((catalog, views))
    }

    /// Every make of `bronze.makes` (none when it is not in the lake), with the sources of
    /// per-make views that lack its rows: a per-make job's output without the make's table
    /// (`silver.ads_base_<slug>`), a table partitioned by `make_id` built for other makes only
    /// (`weir derive --make` on a new `silver.ads_base`). Other sources are not split by make.
    async fn stored_makes(
        &self,
        ctx: &SessionContext,
        tables: &[(String, String, DeltaTable, Arc<dyn TableProvider>)],
    ) -> Result<Vec<(String, i64, BTreeSet<String>)>, ServeError> {
        let lake_err = |e: String| ServeError::Lake(e);
        if !tables.iter().any(|(l, n, _, _)| format!("{l}.{n}") == weir_derive::session::MAKES) {
            return Ok(Vec::new());
        }
        let makes = weir_derive::session::read_makes(ctx).await.map_err(|e| lake_err(e.to_string()))?;
        let read: BTreeSet<&String> = self
            .jobs
            .ordered
            .iter()
            .filter(|j| j.materialize == Materialize::View && j.per.is_some())
            .flat_map(|j| j.sources.iter())
            .collect();
        // Per source: the slugs of its per-make tables, or the make_ids a table partitioned by
        // make was built for (not listed when it was built whole).
        let mut slugs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for s in &read {
            if self.jobs.get(s.split_once('.').map_or("", |p| p.1)).is_some_and(|j| j.per.is_some()) {
                slugs.insert(s.to_string(), BTreeSet::new());
            }
        }
        for (layer, name, table, _) in tables {
            let full = format!("{layer}.{name}");
            match self.jobs.resolve(&full) {
                Some((dep, Some(slug))) if read.contains(&dep.output(None)) => {
                    slugs.entry(dep.output(None)).or_default().insert(slug);
                }
                _ if read.contains(&full) => {
                    let by_make =
                        table.snapshot().is_ok_and(|s| s.metadata().partition_columns().iter().any(|c| c == MAKE_ID));
                    if by_make {
                        // Built whole (every make), or only the partitions derived alone.
                        let rel = format!("{layer}/{name}");
                        let info =
                            weir_lake::last_commit_info(table, &rel).await.map_err(|e| lake_err(e.to_string()))?;
                        let state = info.as_ref().and_then(|i| i.get(weir_derive::run::STATE_KEY));
                        if let Some(built) = weir_derive::run::built_partitions(state) {
                            ids.insert(full, built);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(makes
            .into_iter()
            .map(|(slug, id)| {
                let lacking = slugs
                    .iter()
                    .filter(|(_, s)| !s.contains(&slug))
                    .chain(ids.iter().filter(|(_, v)| !v.contains(&id.to_string())))
                    .map(|(t, _)| t.clone())
                    .collect();
                (slug, id, lacking)
            })
            .collect())
    }

    /// Registers the small stored tables the views join (`silver.model` under every
    /// `gold.ads_<slug>`) as in-memory tables of this snapshot: a point lookup through a view
    /// then builds its join from memory instead of opening and decoding the table's file per
    /// query. Held by version, so a refresh re-reads only a table that changed.
    async fn hold_dimensions(
        &self,
        ctx: &SessionContext,
        tables: &[(String, String, DeltaTable, Arc<dyn TableProvider>)],
    ) -> Result<(), ServeError> {
        let read: std::collections::BTreeSet<&String> = self
            .jobs
            .ordered
            .iter()
            .filter(|j| j.materialize == Materialize::View)
            .flat_map(|j| j.sources.iter())
            .collect();
        let mut held = self.dimensions.lock().await;
        let mut now = std::collections::HashMap::new();
        for (layer, name, table, provider) in tables {
            let full = format!("{layer}.{name}");
            let stored = read.contains(&full)
                && self.jobs.resolve(&full).is_some_and(|(j, slug)| {
                    // Not a table stored for lookups by key (the marts' rows): its files are.
                    slug.is_none() && j.per.is_none() && j.materialize != Materialize::View && !j.key_ranged()
                });
            let Some(version) = table.version().map(|v| v as i64).filter(|_| stored) else { continue };
            let mem = match held.get(&full).filter(|(v, _)| *v == version) {
                Some((_, mem)) => mem.clone(),
                None => {
                    let bytes: i64 = table
                        .snapshot()
                        .map_err(|e| ServeError::Lake(format!("{full}: {e}")))?
                        .log_data()
                        .iter()
                        .map(|f| f.size())
                        .sum();
                    if bytes > DIMENSION_BYTES {
                        continue;
                    }
                    let batches = ctx.read_table(provider.clone())?.collect().await?;
                    Arc::new(datafusion::datasource::MemTable::try_new(provider.schema(), vec![batches])?)
                }
            };
            ctx.deregister_table(full.as_str())?;
            ctx.register_table(full.as_str(), mem.clone())?;
            now.insert(full, (version, mem));
        }
        *held = now;
        Ok(())
    }

    /// A fresh session for one query (its own memory limit) over the shared catalog.
    pub async fn session(&self) -> Result<SessionContext, ServeError> {
        let snap = self.snapshot().await?;
        let ctx = weir_derive::session::session_context_limited(Some(self.memory_limit))
            .map_err(|e| ServeError::Lake(e.to_string()))?;
        ctx.register_catalog(weir_derive::session::CATALOG, snap.catalog.clone());
        weir_ml::sql::register(&ctx, &self.lake);
        for (_, _, table, _) in &snap.tables {
            table.update_datafusion_session(&ctx.state()).map_err(|e| ServeError::Lake(e.to_string()))?;
        }
        Ok(ctx)
    }

    /// Every table and view, for GetTables.
    pub async fn entries(&self) -> Result<Vec<Entry>, ServeError> {
        let snap = self.snapshot().await?;
        let mut out = Vec::new();
        for (layer, name, _, provider) in &snap.tables {
            if snap.views.iter().any(|(l, n)| l == layer && n == name) {
                continue;
            }
            out.push(Entry {
                schema: layer.clone(),
                name: name.clone(),
                kind: "TABLE",
                arrow_schema: provider.schema(),
            });
            if layer == "gold" {
                out.push(Entry {
                    schema: "public".into(),
                    name: name.clone(),
                    kind: "TABLE",
                    arrow_schema: provider.schema(),
                });
            }
        }
        for (name, provider) in &snap.vectors {
            out.push(Entry {
                schema: VECTORS.to_string(),
                name: name.clone(),
                kind: "TABLE",
                arrow_schema: provider.schema(),
            });
        }
        // The views as planned into the snapshot's catalog; gold ones also under bare names.
        for (layer, name) in &snap.views {
            let Some(schema) = snap.catalog.schema(layer) else { continue };
            let Some(view) = schema.table(name).await? else { continue };
            let schemas: &[&str] = if layer == "gold" { &["gold", "public"] } else { &[layer.as_str()] };
            for s in schemas {
                out.push(Entry {
                    schema: s.to_string(),
                    name: name.clone(),
                    kind: "VIEW",
                    arrow_schema: view.schema(),
                });
            }
        }
        Ok(out)
    }
}
