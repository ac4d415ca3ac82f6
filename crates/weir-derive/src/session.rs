//! A DataFusion session over a lake: `bronze.*`, `silver.*`, `gold.*` schemas backed by the
//! Delta tables, PostgreSQL-exact functions, decimals for numeric literals.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::catalog::{MemorySchemaProvider, TableProvider};
use datafusion::prelude::{SessionConfig, SessionContext};
use deltalake::DeltaTable;
use weir_lake::Lake;

use crate::jobs::{Jobs, Materialize};
use crate::{DeriveError, df_err, functions};

pub struct LakeSession {
    pub ctx: SessionContext,
    /// Delta version of every registered table, by `layer.name`.
    pub versions: BTreeMap<String, i64>,
    /// The registered tables as opened, by `layer.name`: a run reads each output's state and
    /// writes it through this handle instead of opening the table again.
    tables: BTreeMap<String, DeltaTable>,
    /// The provider registered for each of `tables`: [`LakeSession::stored_as`] tells a table
    /// still read as stored from one a run has since replaced (a view, rows in memory).
    providers: BTreeMap<String, Arc<dyn TableProvider>>,
}

impl std::fmt::Debug for LakeSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LakeSession").field("versions", &self.versions).finish()
    }
}

/// The catalog every Weir session exposes; gold tables are also in its default schema
/// `public` under their bare names when served.
pub const CATALOG: &str = "weir";

/// The session configuration every Weir query uses: `1.35962` is numeric (a decimal), as in
/// PostgreSQL, not a float.
pub fn session_context() -> Result<SessionContext, DeriveError> {
    session_context_limited(None)
}

/// [`session_context`] with a memory limit for the whole session (bytes): a query over it
/// fails with "Resources exhausted"; nothing spills to disk.
/// Parquet footers and page indexes, shared by every session of the process (per-query
/// serve sessions, per-cycle derive sessions): a point lookup should not re-read them each time. Keyed by path, size and
/// modification time, so a rewritten file is never served from it.
static SHARED_METADATA_CACHE: std::sync::LazyLock<
    Arc<dyn datafusion::execution::cache::cache_manager::FileMetadataCache>,
> = std::sync::LazyLock::new(|| {
    Arc::new(datafusion::execution::cache::DefaultFilesMetadataCache::new(
        datafusion::execution::cache::cache_manager::DEFAULT_METADATA_CACHE_LIMIT,
    ))
});

pub fn session_context_limited(memory_limit: Option<usize>) -> Result<SessionContext, DeriveError> {
    let config = SessionConfig::new()
        .set_bool("datafusion.sql_parser.parse_float_as_decimal", true)
        // Delta tables read text as Utf8, not Utf8View: a hash join's output views point into
        // every buffer of its build side, and a chain of joins then copies those buffers per
        // batch (SF 10 listing features: 15 s and 23 GB for a column of 40 distinct makes).
        .set_bool("datafusion.execution.parquet.schema_force_view_types", false)
        .with_default_catalog_and_schema(CATALOG, "public")
        .with_information_schema(true);
    // Every session of the process shares the Parquet metadata cache: `weir run` opens a new
    // session per cycle, and a cycle's scans (a rule's pass over price_log's files, a merge)
    // should not re-read and re-parse every footer each time.
    let mut runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new().with_cache_manager(
        datafusion::execution::cache::cache_manager::CacheManagerConfig::default()
            .with_file_metadata_cache(Some(SHARED_METADATA_CACHE.clone())),
    );
    if let Some(bytes) = memory_limit {
        runtime = runtime.with_memory_limit(bytes, 1.0).with_disk_manager_builder(
            datafusion::execution::disk_manager::DiskManagerBuilder::default()
                .with_mode(datafusion::execution::disk_manager::DiskManagerMode::Disabled),
        );
    }
    let runtime = runtime.build_arc().map_err(df_err("building the query runtime"))?;
    let mut ctx = SessionContext::new_with_config_rt(config, runtime);
    functions::register(&mut ctx).map_err(df_err("registering Weir's functions"))?;
    let catalog = ctx.catalog(CATALOG).expect("the default catalog exists");
    for layer in ["bronze", "silver", "gold"] {
        catalog.register_schema(layer, Arc::new(MemorySchemaProvider::new())).map_err(df_err("registering schemas"))?;
    }
    Ok(ctx)
}

impl LakeSession {
    /// A session with every landed table of `bronze` registered.
    pub async fn open(lake: &Lake, bronze: &[String]) -> Result<Self, DeriveError> {
        let mut s = Self::empty()?;
        let names: Vec<String> = bronze.iter().map(|t| format!("bronze.{t}")).collect();
        s.register_deltas(lake, &names).await?;
        Ok(s)
    }

    /// A session with no table registered.
    pub fn empty() -> Result<Self, DeriveError> {
        Ok(LakeSession {
            ctx: session_context()?,
            versions: BTreeMap::new(),
            tables: BTreeMap::new(),
            providers: BTreeMap::new(),
        })
    }

    /// Opens `layer.name` (stored at `<lake>/<layer>/<name>`) and registers it when it exists.
    /// Returns its version, None when there is no table yet.
    pub async fn register_delta(&mut self, lake: &Lake, name: &str) -> Result<Option<i64>, DeriveError> {
        let table = weir_lake::open_table(lake, &name.replace('.', "/")).await?;
        self.register_table(name, table).await
    }

    /// [`LakeSession::register_delta`] for several tables, opened eight at a time (opening
    /// reads and replays each table's log, or lists it after the version this process last
    /// saw; a run over every make opens some 45 tables).
    pub async fn register_deltas(&mut self, lake: &Lake, names: &[String]) -> Result<(), DeriveError> {
        use futures::{StreamExt, TryStreamExt};
        let opened: Vec<(String, DeltaTable)> = futures::stream::iter(names)
            .map(|name| async move {
                Ok::<_, DeriveError>((name.clone(), weir_lake::open_table(lake, &name.replace('.', "/")).await?))
            })
            .buffered(8)
            .try_collect()
            .await?;
        for (name, table) in opened {
            self.register_table(&name, table).await?;
        }
        Ok(())
    }

    /// Registers `table` (as opened, or as a commit left it) as `layer.name`. Returns its
    /// version, None when it does not exist yet.
    pub async fn register_table(&mut self, name: &str, table: DeltaTable) -> Result<Option<i64>, DeriveError> {
        let Some(version) = table.version().map(|v| v as i64) else { return Ok(None) };
        let clock = std::time::Instant::now();
        let provider = provider(&self.ctx, &table, name).await?;
        tracing::trace!(table = name, seconds = clock.elapsed().as_secs_f64(), "provider");
        self.replace(name, provider.clone())?;
        self.providers.insert(name.to_string(), provider);
        self.versions.insert(name.to_string(), version);
        self.tables.insert(name.to_string(), table);
        Ok(Some(version))
    }

    /// The data files of the registered table `layer.name` (paths and deletion vectors, one
    /// per line): the same files are the same rows, whatever the version. None when it is not
    /// registered.
    pub fn files_of(&self, name: &str) -> Option<String> {
        let snapshot = self.tables.get(name)?.snapshot().ok()?;
        let mut files: Vec<String> = snapshot
            .log_data()
            .iter()
            .map(|f| match f.deletion_vector_descriptor() {
                Some(dv) => format!("{} {}@{:?}", f.path(), dv.path_or_inline_dv, dv.offset),
                None => f.path().to_string(),
            })
            .collect();
        files.sort_unstable();
        Some(files.join("\n"))
    }

    /// The Delta table registered as `layer.name`, when `provider` is the provider this
    /// session registered for it (not a view or rows a run has since put in its place).
    pub fn stored_as(&self, name: &str, provider: &Arc<dyn TableProvider>) -> Option<&DeltaTable> {
        let registered = self.providers.get(name)?;
        std::ptr::addr_eq(Arc::as_ptr(provider), Arc::as_ptr(registered)).then(|| self.tables.get(name)).flatten()
    }

    /// The table registered as `layer.name` when it is at `version`, else opened now (an
    /// output updated ahead of a derive's loop is not registered again).
    pub async fn table_at(&self, lake: &Lake, name: &str, version: i64) -> Result<DeltaTable, DeriveError> {
        match self.tables.get(name) {
            Some(t) if t.version().map(|v| v as i64) == Some(version) => Ok(t.clone()),
            _ => Ok(weir_lake::open_table(lake, &name.replace('.', "/")).await?),
        }
    }

    /// The table registered as `layer.name`, as it was opened; opened now when it is not
    /// registered (a table that does not exist yet).
    pub async fn table(&self, lake: &Lake, name: &str) -> Result<DeltaTable, DeriveError> {
        match self.tables.get(name) {
            Some(t) => Ok(t.clone()),
            None => Ok(weir_lake::open_table(lake, &name.replace('.', "/")).await?),
        }
    }

    /// A context over the same tables, functions and object stores in which `overrides`
    /// (`layer.name` → provider) stand in for those tables; this session is not touched, so
    /// the fork can plan while other work uses the session. Its plans run on `partitions`
    /// partitions (the session's count when None): units that run side by side on a fork of
    /// their own each need one, and a plan over a few thousand rows in memory spends more
    /// on repartitioning them than on its joins.
    pub async fn fork_with(
        &self,
        overrides: &[(String, Arc<dyn TableProvider>)],
        partitions: Option<usize>,
    ) -> Result<SessionContext, DeriveError> {
        use datafusion::catalog::{
            CatalogProvider, CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList,
        };
        let catalog = Arc::new(MemoryCatalogProvider::new());
        let base = self.ctx.catalog(CATALOG).expect("the default catalog exists");
        for schema_name in base.schema_names() {
            let schema = Arc::new(MemorySchemaProvider::new());
            if let Some(from) = base.schema(&schema_name) {
                for t in from.table_names() {
                    let name = format!("{schema_name}.{t}");
                    let provider = match overrides.iter().find(|(n, _)| *n == name) {
                        Some((_, p)) => Some(p.clone()),
                        None => from.table(&t).await.map_err(df_err(format!("reading {name}")))?,
                    };
                    if let Some(p) = provider {
                        datafusion::catalog::SchemaProvider::register_table(schema.as_ref(), t, p)
                            .map_err(df_err(format!("registering {name}")))?;
                    }
                }
            }
            catalog.register_schema(&schema_name, schema).map_err(df_err("registering schemas"))?;
        }
        let list = Arc::new(MemoryCatalogProviderList::new());
        list.register_catalog(CATALOG.to_string(), catalog);
        let mut state = datafusion::execution::SessionStateBuilder::new_from_existing(self.ctx.state())
            .with_catalog_list(list)
            .build();
        if let Some(n) = partitions {
            state.config_mut().options_mut().execution.target_partitions = n.max(1);
        }
        Ok(SessionContext::new_with_state(state))
    }

    /// Registers `output` (`gold.ads_vw`) for reading: a stored table as it is, a view planned
    /// over its sources, registered the same way. Returns the stored table whose last commit
    /// records how `output` was built (the table itself, or the per-make stored rows a per-make
    /// view reads), None when `output` or something it reads is not in the lake.
    pub async fn register_output(
        &mut self,
        lake: &Lake,
        jobs: &Jobs,
        output: &str,
    ) -> Result<Option<String>, DeriveError> {
        let stored = |v: Option<i64>| v.map(|_| output.to_string());
        let Some((job, slug)) = jobs.resolve(output).filter(|(j, _)| j.materialize == Materialize::View) else {
            return Ok(stored(self.register_delta(lake, output).await?));
        };
        let own: BTreeMap<&str, String> = match &slug {
            Some(slug) => job.own_make_sources(jobs, slug).collect(),
            None => BTreeMap::new(),
        };
        let (mut built, mut first) = (None, None);
        for s in &job.sources {
            let source = own.get(s.as_str()).unwrap_or(s);
            let Some(table) = Box::pin(self.register_output(lake, jobs, source)).await? else { return Ok(None) };
            if own.contains_key(s.as_str()) && built.is_none() {
                built = Some(table.clone());
            }
            first.get_or_insert(table);
        }
        let built = built.or(first);
        let make = match &slug {
            Some(slug) => {
                if !self.versions.contains_key(MAKES) && self.register_delta(lake, MAKES).await?.is_none() {
                    return Ok(None);
                }
                let all = read_makes(&self.ctx).await?;
                match all.into_iter().find(|(s, _)| s == slug) {
                    Some(m) => Some(m),
                    None => return Ok(None),
                }
            }
            None => None,
        };
        let make = make.as_ref().map(|(s, id)| (s.as_str(), *id));
        let df = self.ctx.sql(&job.expand_view(make)).await.map_err(df_err(format!("planning {output}")))?;
        self.replace(output, df.into_view())?;
        Ok(built)
    }

    /// Registers (or re-registers) a provider under `layer.name`.
    pub fn replace(&self, name: &str, provider: Arc<dyn TableProvider>) -> Result<(), DeriveError> {
        let _ = self.ctx.deregister_table(name);
        self.ctx.register_table(name, provider).map_err(df_err(format!("registering {name}")))?;
        Ok(())
    }
}

/// The source table of the makes a per-make job runs for (its `slug` and `make_id`).
pub const MAKES: &str = "bronze.makes";

/// The column a table is partitioned by to be rebuilt one make at a time.
pub const MAKE_ID: &str = "make_id";

/// (slug, make_id) of every make in `bronze.makes` as registered in `ctx`, by make_id.
pub async fn read_makes(ctx: &SessionContext) -> Result<Vec<(String, i64)>, DeriveError> {
    let batches = ctx
        .sql(&format!("SELECT slug, CAST(make_id AS BIGINT) AS id FROM {MAKES} ORDER BY id"))
        .await
        .map_err(df_err("listing makes"))?
        .collect()
        .await
        .map_err(df_err("listing makes"))?;
    let mut all = Vec::new();
    for b in &batches {
        let col = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8)
            .map_err(|e| df_err("listing makes")(e.into()))?;
        let col = arrow::array::AsArray::as_string::<i32>(&col);
        let ids = arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(b.column(1));
        all.extend(col.iter().zip(ids.iter()).filter_map(|(s, id)| Some((s?.to_string(), id?))));
    }
    Ok(all)
}

/// A Delta table's provider for `ctx`, configured from it (text as Utf8, see
/// [`session_context`]); a table with deletion vectors is read in whole files (see
/// [`weir_lake::dvscan`]).
pub async fn provider(
    ctx: &SessionContext,
    table: &DeltaTable,
    name: &str,
) -> Result<Arc<dyn TableProvider>, DeriveError> {
    table
        .update_datafusion_session(&ctx.state())
        .map_err(|e| DeriveError::Write { table: name.to_string(), message: e.to_string() })?;
    let provider =
        table.table_provider().with_session(Arc::new(ctx.state())).await.map_err(df_err(format!("reading {name}")))?;
    Ok(if weir_lake::dv::has_deletion_vectors(table) {
        weir_lake::dvscan::whole_files(provider, table)
    } else {
        provider
    })
}
