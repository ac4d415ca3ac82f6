//! Reading Delta tables with deletion vectors through delta-rs 0.32 safely.
//!
//! delta-rs applies a file's deletion vector as one row mask, consumed in the order the file's
//! batches arrive at its scan node (`DeltaScanExec`). DataFusion's physical optimizer breaks
//! that order in two ways, both seen in `tests/e2e/dv.rs` and at SF 10 (a mart with 9,000
//! extra rows and 244 missing):
//!
//! - it puts a round-robin repartition between the Parquet scan and `DeltaScanExec` (which
//!   says it benefits from more input partitions), so two streams take turns consuming one
//!   file's mask;
//! - it pushes filters (a `WHERE`, a join's or a top-k's dynamic filter) through
//!   `DeltaScanExec` into the Parquet scan, which then skips pages and row groups.
//!
//! [`whole_files`] hands DataFusion the scan as one leaf node, so no optimizer rule reaches
//! inside it, and deals the files (whole) to as many streams as the session has partitions:
//! every file is read from its first row to its last by one stream. The table's own file
//! skipping (by statistics, from the filters given to `scan`) stays.
//!
//! Filters the nodes above push down while the plan runs (a hash join's key range, known once
//! its build side is read) skip whole files too: the leaf takes them, and each stream, when
//! first polled, drops its files whose statistics rule them out. A whole file skipped leaves
//! the others' deletion vectors in step (delta-rs keys each mask by its file); rows inside
//! a file are never skipped.

use std::any::Any;
use std::sync::Arc;

use arrow_schema::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{Result, Statistics};
use datafusion::datasource::TableType;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::filter_pushdown::{
    ChildPushdownResult, FilterPushdownPhase, FilterPushdownPropagation, PushedDown,
};
use datafusion::physical_plan::metrics::{Count, ExecutionPlanMetricsSet, MetricBuilder, MetricsSet};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PhysicalExpr, PlanProperties};

/// `provider` (of `table`) read in whole files: see the module documentation.
pub fn whole_files(provider: Arc<dyn TableProvider>, table: &deltalake::DeltaTable) -> Arc<dyn TableProvider> {
    Arc::new(WholeFiles(provider, Arc::new(FileBounds { table: table.clone(), by_file: Default::default() })))
}

#[derive(Debug)]
struct WholeFiles(Arc<dyn TableProvider>, Arc<FileBounds>);

/// Bounds by file name, then by column.
type Bounds = std::collections::HashMap<String, std::collections::HashMap<String, (i64, i64)>>;

/// The minimum and maximum of each integer column in each file of a table, from its log
/// (delta-rs hands a scan without filters no column statistics), read when first needed.
#[derive(Debug)]
struct FileBounds {
    table: deltalake::DeltaTable,
    by_file: std::sync::OnceLock<Bounds>,
}

impl FileBounds {
    fn get(&self) -> &Bounds {
        self.by_file.get_or_init(|| {
            let Ok(snapshot) = self.table.snapshot() else { return Bounds::new() };
            let mut out = Bounds::new();
            for f in snapshot.log_data().iter() {
                let Some(stats) = f.stats().and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok()) else {
                    continue;
                };
                let (Some(min), Some(max)) = (stats["minValues"].as_object(), stats["maxValues"].as_object()) else {
                    continue;
                };
                let columns =
                    min.iter().filter_map(|(c, lo)| Some((c.clone(), (lo.as_i64()?, max.get(c)?.as_i64()?)))).collect();
                // Files are named by a UUID: the name alone is unique in the table.
                let path = f.path();
                let name = path.rsplit('/').next().unwrap_or(&path).to_string();
                out.insert(name, columns);
            }
            out
        })
    }
}

#[async_trait::async_trait]
impl TableProvider for WholeFiles {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn schema(&self) -> SchemaRef {
        self.0.schema()
    }

    fn table_type(&self) -> TableType {
        self.0.table_type()
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> Result<Vec<TableProviderFilterPushDown>> {
        self.0.supports_filters_pushdown(filters)
    }

    fn statistics(&self) -> Option<Statistics> {
        self.0.statistics()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let input = self.0.scan(state, projection, filters, limit).await?;
        let input = spread_files(input, state.config().target_partitions())?;
        Ok(Arc::new(WholeFilesExec::new(input, self.1.clone(), Vec::new())))
    }
}

/// `plan` with each Parquet scan's files dealt into up to `partitions` groups, whole files
/// only (largest first, each to the group with the fewest bytes): one stream reads each file
/// from its first row to its last, and the scan still uses every core.
fn spread_files(plan: Arc<dyn ExecutionPlan>, partitions: usize) -> Result<Arc<dyn ExecutionPlan>> {
    use datafusion::datasource::physical_plan::FileGroup;
    with_file_groups(plan, |config| {
        let mut files: Vec<_> = config.file_groups.iter().flat_map(|g| g.iter().cloned()).collect();
        let groups = partitions.clamp(1, files.len().max(1));
        if groups <= config.file_groups.len() {
            return Ok(None);
        }
        files.sort_by_key(|f| std::cmp::Reverse(f.object_meta.size));
        let mut dealt: Vec<(u64, Vec<_>)> = vec![(0, Vec::new()); groups];
        for f in files {
            let g = dealt.iter_mut().min_by_key(|(bytes, _)| *bytes).expect("at least one group");
            g.0 += f.object_meta.size;
            g.1.push(f);
        }
        Ok(Some(dealt.into_iter().map(|(_, f)| FileGroup::new(f)).collect()))
    })
}

/// `plan` with the file groups of each Parquet scan that `regroup` gives new ones for.
fn with_file_groups(
    plan: Arc<dyn ExecutionPlan>,
    mut regroup: impl FnMut(
        &datafusion::datasource::physical_plan::FileScanConfig,
    ) -> Result<Option<Vec<datafusion::datasource::physical_plan::FileGroup>>>,
) -> Result<Arc<dyn ExecutionPlan>> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    use datafusion::datasource::physical_plan::{FileScanConfig, FileScanConfigBuilder};
    use datafusion::datasource::source::DataSourceExec;
    plan.transform_down(|node| {
        let Some(config) = node
            .as_any()
            .downcast_ref::<DataSourceExec>()
            .and_then(|d| d.data_source().as_any().downcast_ref::<FileScanConfig>())
        else {
            return Ok(Transformed::no(node));
        };
        let Some(groups) = regroup(config)? else {
            return Ok(Transformed::no(node));
        };
        let config = FileScanConfigBuilder::from(config.clone()).with_file_groups(groups).build();
        Ok(Transformed::yes(DataSourceExec::from_data_source(config) as Arc<dyn ExecutionPlan>))
    })
    .map(|t| t.data)
}

/// The scan below, as a leaf: the optimizer sees no child to repartition or push filters into.
#[derive(Debug)]
struct WholeFilesExec {
    input: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
    bounds: Arc<FileBounds>,
    /// Filters pushed down from above (dynamic ones among them), over this node's output:
    /// they skip whole files when a stream starts, and stay applied above.
    filters: Vec<Arc<dyn PhysicalExpr>>,
    /// `files_skipped`: files the pushed filters ruled out (EXPLAIN ANALYZE shows it).
    skipped: ExecutionPlanMetricsSet,
}

impl WholeFilesExec {
    fn new(input: Arc<dyn ExecutionPlan>, bounds: Arc<FileBounds>, filters: Vec<Arc<dyn PhysicalExpr>>) -> Self {
        WholeFilesExec { properties: input.properties().clone(), input, bounds, filters, skipped: Default::default() }
    }
}

/// `plan` with the files of `partition`'s group that `filters` rule out by their statistics
/// left out (a snapshot of dynamic filters as they are now); the plan itself when none is.
fn skip_files(
    plan: Arc<dyn ExecutionPlan>,
    bounds: &FileBounds,
    filters: &[Arc<dyn PhysicalExpr>],
    partition: usize,
    skipped: &Count,
) -> Result<Arc<dyn ExecutionPlan>> {
    use datafusion::datasource::physical_plan::FileGroup;
    use datafusion::physical_optimizer::pruning::PruningPredicate;
    let schema = plan.schema();
    // A filter that cannot be turned into a test of statistics is no test.
    let predicates: Vec<PruningPredicate> = filters
        .iter()
        .filter_map(|f| PruningPredicate::try_new(f.clone(), schema.clone()).ok())
        .filter(|p| !p.always_true())
        .collect();
    if predicates.is_empty() {
        return Ok(plan);
    }
    with_file_groups(plan, |config| {
        let Some(group) = config.file_groups.get(partition) else {
            return Ok(None);
        };
        let stats = FileStats { files: group.files(), bounds: bounds.get(), output: schema.clone() };
        let mut keep = vec![true; group.len()];
        for p in &predicates {
            for (k, may) in keep.iter_mut().zip(p.prune(&stats)?) {
                *k &= may;
            }
        }
        if keep.iter().all(|k| *k) {
            return Ok(None);
        }
        skipped.add(keep.iter().filter(|k| !**k).count());
        let mut groups = config.file_groups.clone();
        groups[partition] =
            FileGroup::new(group.iter().zip(&keep).filter(|(_, k)| **k).map(|(f, _)| f.clone()).collect());
        Ok(Some(groups))
    })
}

/// The minimum and maximum of an integer column in each file of a group, from the table's
/// log (by name: the output's column is the file's). A file without them has none (it is
/// kept), as has every file for a column of another type.
struct FileStats<'a> {
    files: &'a [datafusion::datasource::listing::PartitionedFile],
    bounds: &'a Bounds,
    output: SchemaRef,
}

impl FileStats<'_> {
    fn bound(&self, column: &datafusion::common::Column, min: bool) -> Option<arrow::array::ArrayRef> {
        use datafusion::common::ScalarValue;
        let ty = self.output.field_with_name(column.name()).ok()?.data_type().clone();
        if !ty.is_integer() {
            return None;
        }
        let null = ScalarValue::try_from(&ty).ok()?;
        let values = self.files.iter().map(|f| {
            let bound = f.object_meta.location.filename().and_then(|n| self.bounds.get(n)?.get(column.name()));
            bound
                .and_then(|(lo, hi)| ScalarValue::Int64(Some(if min { *lo } else { *hi })).cast_to(&ty).ok())
                .unwrap_or_else(|| null.clone())
        });
        ScalarValue::iter_to_array(values).ok()
    }
}

impl datafusion::common::pruning::PruningStatistics for FileStats<'_> {
    fn min_values(&self, column: &datafusion::common::Column) -> Option<arrow::array::ArrayRef> {
        self.bound(column, true)
    }

    fn max_values(&self, column: &datafusion::common::Column) -> Option<arrow::array::ArrayRef> {
        self.bound(column, false)
    }

    fn num_containers(&self) -> usize {
        self.files.len()
    }

    fn null_counts(&self, _column: &datafusion::common::Column) -> Option<arrow::array::ArrayRef> {
        None
    }

    fn row_counts(&self, _column: &datafusion::common::Column) -> Option<arrow::array::ArrayRef> {
        None
    }

    fn contained(
        &self,
        _column: &datafusion::common::Column,
        _values: &std::collections::HashSet<datafusion::common::ScalarValue>,
    ) -> Option<arrow::array::BooleanArray> {
        None
    }
}

impl DisplayAs for WholeFilesExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "WholeFilesExec: ")?;
        if !self.filters.is_empty() {
            write!(f, "files skipped by {} pushed filter(s), ", self.filters.len())?;
        }
        write!(f, "{}", datafusion::physical_plan::displayable(self.input.as_ref()).one_line())
    }
}

impl ExecutionPlan for WholeFilesExec {
    fn name(&self) -> &str {
        "WholeFilesExec"
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn with_new_children(self: Arc<Self>, _children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        use futures::TryStreamExt;
        if self.filters.is_empty() {
            return self.input.execute(partition, context);
        }
        // Files are skipped when the stream is first polled: a join polls its probe side once
        // its build side is read, so its dynamic filter then holds the build side's keys.
        let (input, filters, bounds) = (self.input.clone(), self.filters.clone(), self.bounds.clone());
        let skipped = MetricBuilder::new(&self.skipped).counter("files_skipped", partition);
        let stream = futures::stream::once(async move {
            skip_files(input, &bounds, &filters, partition, &skipped).and_then(|plan| plan.execute(partition, context))
        })
        .try_flatten();
        Ok(Box::pin(datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(self.input.schema(), stream)))
    }

    fn handle_child_pushdown_result(
        &self,
        _phase: FilterPushdownPhase,
        child_pushdown_result: ChildPushdownResult,
        _config: &datafusion::config::ConfigOptions,
    ) -> Result<FilterPushdownPropagation<Arc<dyn ExecutionPlan>>> {
        let offered: Vec<_> = child_pushdown_result.parent_filters.into_iter().map(|f| f.filter).collect();
        // Not applied to rows here: the nodes above keep them.
        let answer = vec![PushedDown::No; offered.len()];
        if offered.is_empty() {
            return Ok(FilterPushdownPropagation { filters: answer, updated_node: None });
        }
        let mut filters = self.filters.clone();
        filters.extend(offered);
        let node = WholeFilesExec::new(self.input.clone(), self.bounds.clone(), filters);
        Ok(FilterPushdownPropagation { filters: answer, updated_node: Some(Arc::new(node)) })
    }

    fn metrics(&self) -> Option<MetricsSet> {
        let mut set = self.input.metrics().unwrap_or_default();
        for m in self.skipped.clone_inner().iter() {
            set.push(m.clone());
        }
        Some(set)
    }

    fn partition_statistics(&self, partition: Option<usize>) -> Result<Statistics> {
        self.input.partition_statistics(partition)
    }
}
