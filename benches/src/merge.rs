//! A merge by key into a partitioned Delta table: Weir's merge-on-read (`weir_lake::merge_by_key`:
//! deletion vectors, new rows in new files, the change data feed) against delta-rs's own
//! `MERGE` (copy-on-write), on copies of the same table with the same source, in one run.
//!
//! The table is shaped like `bronze.listings` (a key, a text partition of 15 countries, text,
//! integers, a numeric, a timestamp); the source, like a CDC day, updates a tenth of the rows
//! spread over every file, inserts new keys and deletes a few. Both results are read back
//! through the same deletion-vector-aware provider and must agree with each other and with the
//! expected row count.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use arrow::array::{
    Array, ArrayRef, Decimal128Array, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::kernel::transaction::CommitProperties;
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use weir_core::{LakeLocation, S3Settings};
use weir_lake::{Lake, OP_COLUMN};

const REL: &str = "bronze/merge_probe";
const COUNTRIES: [&str; 15] =
    ["AT", "BE", "CZ", "DE", "DK", "ES", "FI", "FR", "IT", "NL", "PL", "PT", "RO", "SE", "SK"];

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("country", DataType::Utf8, false),
        Field::new("title", DataType::Utf8, false),
        Field::new("mileage_km", DataType::Int32, true),
        Field::new("price", DataType::Decimal128(12, 2), true),
        Field::new("updated_at", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
    ]))
}

/// splitmix64: the same rows every run.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Rows `ids` in round `round` (0: the table as created; later rounds change every value but
/// the key and its country).
fn rows(ids: &[i64], round: u64, ops: Option<&[&str]>) -> Result<RecordBatch> {
    let h = |id: i64, salt: u64| mix((id as u64) ^ (round << 48) ^ (salt << 56));
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(ids.to_vec())),
        Arc::new(StringArray::from_iter_values(ids.iter().map(|&id| COUNTRIES[(mix(id as u64) % 15) as usize]))),
        Arc::new(StringArray::from_iter_values(
            ids.iter().map(|&id| format!("listing {id} round {round} {:x}", h(id, 1) % 1_000_000)),
        )),
        Arc::new(Int32Array::from_iter(
            ids.iter().map(|&id| (h(id, 2) % 10 != 0).then(|| (h(id, 3) % 300_000) as i32)),
        )),
        Arc::new(
            Decimal128Array::from_iter(
                ids.iter().map(|&id| (h(id, 4) % 20 != 0).then(|| (h(id, 5) % 10_000_000) as i128)),
            )
            .with_precision_and_scale(12, 2)?,
        ),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(ids.iter().map(|&id| {
                1_750_000_000_000_000 + (round as i64) * 86_400_000_000 + (h(id, 6) % 86_400_000_000) as i64
            }))
            .with_timezone("UTC"),
        ),
    ];
    let mut fields: Vec<Field> = schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    if let Some(ops) = ops {
        cols.push(Arc::new(StringArray::from(ops.to_vec())));
        fields.push(Field::new(OP_COLUMN, DataType::Utf8, false));
    }
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
}

fn open_lake(root: &Path) -> Result<Lake> {
    Ok(Lake::open(LakeLocation::Local { root: root.to_path_buf() }, &S3Settings::default(), false)?)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

/// (rows, sum of ids, sum of mileage, sum of title lengths, sum of prices) of the table, read
/// through the provider every Weir reader uses (deletion vectors applied).
async fn digest(lake: &Lake) -> Result<Vec<String>> {
    let ctx = weir_derive::session::session_context()?;
    let table = weir_lake::open_table(lake, REL).await?;
    ctx.register_table("t", weir_derive::session::provider(&ctx, &table, REL).await?)?;
    let sql = "SELECT count(*), sum(id), sum(CAST(mileage_km AS BIGINT)), sum(length(title)), CAST(sum(price) AS VARCHAR), \
               count(DISTINCT id), CAST(max(updated_at) AS VARCHAR) FROM t";
    let batches = ctx.sql(sql).await?.collect().await?;
    let b = batches.first().context("no digest row")?;
    (0..b.num_columns())
        .map(|c| {
            let v = arrow::compute::cast(b.column(c), &DataType::Utf8)?;
            let v = v.as_any().downcast_ref::<StringArray>().context("a digest column")?;
            Ok(if v.is_valid(0) { v.value(0).to_string() } else { "NULL".into() })
        })
        .collect()
}

pub async fn merge(rows_total: i64, changes: usize, runs: u32) -> Result<()> {
    if rows_total < 1000 || changes == 0 || changes as i64 > rows_total {
        bail!("--rows must be at least 1000 and --changes between 1 and --rows");
    }
    let root: PathBuf = std::env::temp_dir().join(format!("weir-bench-merge-{}", std::process::id()));
    let result = run(&root, rows_total, changes, runs).await;
    let _ = std::fs::remove_dir_all(&root);
    result
}

async fn run(root: &Path, rows_total: i64, changes: usize, runs: u32) -> Result<()> {
    // The table: one file per country, as a backfill writes it.
    let base = root.join("base");
    let lake = open_lake(&base)?;
    let clock = Instant::now();
    let ids: Vec<i64> = (0..rows_total).collect();
    let table = weir_lake::open_table(&lake, REL).await?;
    let mut w = RecordBatchWriter::try_new(lake.table_url(REL).as_str(), schema(), Some(vec!["country".into()]), None)?
        .with_writer_properties(WriterProperties::builder().build());
    for chunk in ids.chunks(256 * 1024) {
        w.write(rows(chunk, 0, None)?).await?;
    }
    let adds = w.flush().await?;
    let files = adds.len();
    weir_lake::commit_files(table, REL, &schema(), &["country".into()], adds, Default::default(), None, None, None)
        .await?;
    println!("table: {rows_total} rows in {files} files (15 country partitions), written in {:.2?}", clock.elapsed());

    // The source: updates of a tenth spread over every file (distinct keys), 1 in 20 of them
    // deletes, and a tenth as many new keys.
    let mut keys: Vec<i64> = Vec::with_capacity(changes);
    let mut seen = std::collections::HashSet::with_capacity(changes);
    let mut i = 0u64;
    while keys.len() < changes {
        let k = (mix(i ^ 0xC0FFEE) % rows_total as u64) as i64;
        i += 1;
        if seen.insert(k) {
            keys.push(k);
        }
    }
    let inserts = changes / 10;
    keys.extend(rows_total..rows_total + inserts as i64);
    let ops: Vec<&str> =
        keys.iter().enumerate().map(|(j, &k)| if k < rows_total && j % 20 == 7 { "D" } else { "U" }).collect();
    let deletes = ops.iter().filter(|o| **o == "D").count();
    let source = rows(&keys, 1, Some(&ops))?;
    println!("source: {} updates, {deletes} deletes, {inserts} inserts", changes - deletes,);
    let expected = (rows_total as usize + inserts - deletes).to_string();

    let (mut best_weir, mut best_delta) = (Duration::MAX, Duration::MAX);
    for r in 0..runs {
        // Weir: merge-on-read.
        let dir = root.join(format!("weir{r}"));
        copy_dir(&base, &dir)?;
        let lake = open_lake(&dir)?;
        let table = weir_lake::open_table(&lake, REL).await?;
        let clock = Instant::now();
        let (_, stats) = weir_lake::merge_by_key(
            &lake,
            table,
            REL,
            source.clone(),
            &["id".to_string()],
            WriterProperties::builder().build(),
            CommitProperties::default(),
            weir_lake::MergeLayout::default(),
            None,
        )
        .await?;
        let weir_took = clock.elapsed();
        let weir_digest = digest(&lake).await?;

        // delta-rs: MERGE ... WHEN MATCHED AND op = 'D' DELETE WHEN MATCHED UPDATE WHEN NOT
        // MATCHED INSERT, on a copy of the same table.
        let dir = root.join(format!("delta{r}"));
        copy_dir(&base, &dir)?;
        let lake = open_lake(&dir)?;
        let table = weir_lake::open_table(&lake, REL).await?;
        let ctx = datafusion::prelude::SessionContext::new();
        let src = ctx.read_batch(source.clone())?;
        let columns: Vec<String> = schema().fields().iter().map(|f| f.name().clone()).collect();
        let clock = Instant::now();
        let (_, metrics) = table
            .merge(src, "t.id = s.id")
            .with_source_alias("s")
            .with_target_alias("t")
            .when_matched_delete(|d| d.predicate(format!("s.{OP_COLUMN} = 'D'")))?
            .when_matched_update(|mut u| {
                for c in columns.iter().filter(|c| *c != "id") {
                    u = u.update(c.as_str(), format!("s.{c}"));
                }
                u
            })?
            .when_not_matched_insert(|mut i| {
                i = i.predicate(format!("s.{OP_COLUMN} <> 'D'"));
                for c in &columns {
                    i = i.set(c.as_str(), format!("s.{c}"));
                }
                i
            })?
            .await?;
        let delta_took = clock.elapsed();
        let delta_digest = digest(&lake).await?;

        if weir_digest != delta_digest || weir_digest[0] != expected || weir_digest[5] != expected {
            bail!(
                "run {r}: the merges disagree: weir {weir_digest:?}, delta-rs {delta_digest:?}, expected {expected} rows"
            );
        }
        if (stats.inserted, stats.deleted) != (inserts as u64, deletes as u64)
            || metrics.num_target_rows_inserted != inserts
            || metrics.num_target_rows_deleted != deletes
        {
            bail!("run {r}: counts differ: weir {stats:?}, delta-rs {metrics:?}");
        }
        println!(
            "run {r}: weir merge-on-read {:.3} s, delta-rs MERGE {:.3} s (weir / delta-rs = {:.2}); results equal ({} rows)",
            weir_took.as_secs_f64(),
            delta_took.as_secs_f64(),
            weir_took.as_secs_f64() / delta_took.as_secs_f64(),
            weir_digest[0]
        );
        best_weir = best_weir.min(weir_took);
        best_delta = best_delta.min(delta_took);
        std::fs::remove_dir_all(root.join(format!("weir{r}")))?;
        std::fs::remove_dir_all(root.join(format!("delta{r}")))?;
    }
    println!(
        "best of {runs}: weir {:.3} s, delta-rs {:.3} s: weir / delta-rs = {:.3}",
        best_weir.as_secs_f64(),
        best_delta.as_secs_f64(),
        best_weir.as_secs_f64() / best_delta.as_secs_f64()
    );
    Ok(())
}
