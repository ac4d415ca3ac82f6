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
//! every file is read from its first row to its last by one stream. The table's own file skipping (by statistics, from the
//! filters given to `scan`) stays.

use std::any::Any;
use std::sync::Arc;

use arrow_schema::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{Result, Statistics};
use datafusion::datasource::TableType;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};

/// `provider` read in whole files: see the module documentation.
pub fn whole_files(provider: Arc<dyn TableProvider>) -> Arc<dyn TableProvider> {
    Arc::new(WholeFiles(provider))
}

#[derive(Debug)]
struct WholeFiles(Arc<dyn TableProvider>);

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
        Ok(Arc::new(WholeFilesExec { properties: input.properties().clone(), input }))
    }
}

/// `plan` with each Parquet scan's files dealt into up to `partitions` groups, whole files
/// only (largest first, each to the group with the fewest bytes): one stream reads each file
/// from its first row to its last, and the scan still uses every core.
fn spread_files(plan: Arc<dyn ExecutionPlan>, partitions: usize) -> Result<Arc<dyn ExecutionPlan>> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig, FileScanConfigBuilder};
    use datafusion::datasource::source::DataSourceExec;
    plan.transform_down(|node| {
        let Some(config) = node
            .as_any()
            .downcast_ref::<DataSourceExec>()
            .and_then(|d| d.data_source().as_any().downcast_ref::<FileScanConfig>())
        else {
            return Ok(Transformed::no(node));
        };
        let mut files: Vec<_> = config.file_groups.iter().flat_map(|g| g.iter().cloned()).collect();
        let groups = partitions.clamp(1, files.len().max(1));
        if groups <= config.file_groups.len() {
            return Ok(Transformed::no(node));
        }
        files.sort_by_key(|f| std::cmp::Reverse(f.object_meta.size));
        let mut dealt: Vec<(u64, Vec<_>)> = vec![(0, Vec::new()); groups];
        for f in files {
            let g = dealt.iter_mut().min_by_key(|(bytes, _)| *bytes).expect("at least one group");
            g.0 += f.object_meta.size;
            g.1.push(f);
        }
        let config = FileScanConfigBuilder::from(config.clone())
            .with_file_groups(dealt.into_iter().map(|(_, f)| FileGroup::new(f)).collect())
            .build();
        Ok(Transformed::yes(DataSourceExec::from_data_source(config) as Arc<dyn ExecutionPlan>))
    })
    .map(|t| t.data)
}

/// The scan below, as a leaf: the optimizer sees no child to repartition or push filters into.
#[derive(Debug)]
struct WholeFilesExec {
    input: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
}

impl DisplayAs for WholeFilesExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "WholeFilesExec: {}", datafusion::physical_plan::displayable(self.input.as_ref()).one_line())
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
        self.input.execute(partition, context)
    }

    fn metrics(&self) -> Option<datafusion::physical_plan::metrics::MetricsSet> {
        self.input.metrics()
    }

    fn partition_statistics(&self, partition: Option<usize>) -> Result<Statistics> {
        self.input.partition_statistics(partition)
    }
}
