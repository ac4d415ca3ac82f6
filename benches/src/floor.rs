//! The floor of a CDC day: work that any implementation of the pipeline must do, timed alone.
//!
//! - PostgreSQL's own logical decoding of the day's WAL through the slot (pgoutput, binary),
//!   with the client only counting the messages.
//! - Parquet encoding of the rows the day really changed in the lake: for every Delta table,
//!   the rows of the data files the day's commits added minus the rows of the files they
//!   retired (so a file rewritten only to carry unchanged rows counts nothing), encoded once
//!   into memory with the file's own compression. No read, join, change-data file, deletion
//!   vector or Delta log is timed.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use arrow::array::{BooleanArray, RecordBatch};
use arrow::compute::{concat_batches, filter_record_batch};
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, SortField};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::{EnabledStatistics, WriterProperties};

/// Every Delta table of the lake (`weir_lake::delta_tables`, local at `root`) and its latest version.
pub async fn versions(lake: &weir_lake::Lake, root: &Path) -> Result<HashMap<PathBuf, i64>> {
    let mut out = HashMap::new();
    for rel in weir_lake::delta_tables(lake).await? {
        let dir = root.join(&rel);
        let version = latest_version(&dir.join("_delta_log"))?;
        out.insert(dir, version);
    }
    Ok(out)
}

fn latest_version(log: &Path) -> Result<i64> {
    let mut latest = -1;
    for e in std::fs::read_dir(log).with_context(|| format!("listing {}", log.display()))? {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(v) = name.strip_suffix(".json").and_then(|s| s.parse::<i64>().ok()) {
            latest = latest.max(v);
        }
    }
    Ok(latest)
}

/// The data files the commits after `after` added (and that are still active) and the files
/// active before them that they removed. A file removed and added back in one commit (a
/// deletion vector attached to it) changes neither set.
fn files_since(table: &Path, after: i64, to: i64) -> Result<(HashSet<String>, HashSet<String>)> {
    let (mut added, mut retired) = (HashSet::new(), HashSet::new());
    for v in after + 1..=to {
        let file = table.join("_delta_log").join(format!("{v:020}.json"));
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        let (mut adds, mut removes) = (HashSet::new(), HashSet::new());
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let action: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("parsing {}", file.display()))?;
            let path = |kind: &str| action.get(kind).and_then(|a| a["path"].as_str()).map(str::to_string);
            if let Some(p) = path("add") {
                adds.insert(p);
            } else if let Some(p) = path("remove") {
                removes.insert(p);
            }
        }
        for p in removes.difference(&adds) {
            if !added.remove(p) {
                retired.insert(p.clone());
            }
        }
        for p in adds.difference(&removes) {
            added.insert(p.clone());
        }
    }
    Ok((added, retired))
}

fn read_rows(table: &Path, files: &HashSet<String>) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::new();
    for f in files {
        let path = table.join(f);
        let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        for b in ParquetRecordBatchReaderBuilder::try_new(file)?.with_batch_size(64 * 1024).build()? {
            out.push(b?);
        }
    }
    Ok(out)
}

/// The writer settings of one of `files` (its first column's compression and dictionary).
fn properties_of(table: &Path, files: &HashSet<String>) -> Result<WriterProperties> {
    let Some(f) = files.iter().next() else { return Ok(WriterProperties::default()) };
    let path = table.join(f);
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let meta = ParquetRecordBatchReaderBuilder::try_new(file)?.metadata().clone();
    let (compression, dictionary) = match meta.row_groups().first().map(|g| g.column(0)) {
        Some(c) => (c.compression(), c.dictionary_page_offset().is_some()),
        None => (Compression::UNCOMPRESSED, false),
    };
    Ok(WriterProperties::builder()
        .set_compression(compression)
        .set_dictionary_enabled(dictionary)
        .set_statistics_enabled(EnabledStatistics::Page)
        .build())
}

/// What the day changed in one table, and the time to encode those rows alone.
pub struct TableFloor {
    pub table: String,
    pub rows_written: u64,
    pub rows_changed: u64,
    pub encode: Duration,
}

/// [`TableFloor`] for every table whose version moved since `before`.
pub async fn encode_floor(
    lake: &weir_lake::Lake,
    root: &Path,
    before: &HashMap<PathBuf, i64>,
) -> Result<Vec<TableFloor>> {
    let mut out = Vec::new();
    for (table, to) in versions(lake, root).await? {
        let from = before.get(&table).copied().unwrap_or(-1);
        if to <= from {
            continue;
        }
        let (added, retired) = files_since(&table, from, to)?;
        if added.is_empty() {
            continue;
        }
        let new = read_rows(&table, &added)?;
        let Some(first) = new.first() else { continue };
        let fields: Vec<_> = first.schema().fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect();
        let schema: SchemaRef = std::sync::Arc::new(arrow::datatypes::Schema::new(fields));
        let new = new.into_iter().map(|b| Ok(weir_lake::conform(&schema, b, "floor")?)).collect::<Result<Vec<_>>>()?;
        let new = concat_batches(&schema, &new)?;
        // Rows of the retired files, as a multiset of row encodings.
        let converter =
            RowConverter::new(schema.fields().iter().map(|f| SortField::new(f.data_type().clone())).collect())?;
        let mut old: HashMap<Vec<u8>, u32> = HashMap::new();
        for b in read_rows(&table, &retired)? {
            let rows = converter.convert_columns(weir_lake::conform(&schema, b, "floor")?.columns())?;
            for r in rows.iter() {
                *old.entry(r.as_ref().to_vec()).or_default() += 1;
            }
        }
        let rows = converter.convert_columns(new.columns())?;
        let keep: BooleanArray = rows
            .iter()
            .map(|r| match old.get_mut(r.as_ref()) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    Some(false)
                }
                _ => Some(true),
            })
            .collect();
        let changed = filter_record_batch(&new, &keep)?;
        let props = properties_of(&table, &added)?;
        let t = Instant::now();
        let mut w = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props))?;
        w.write(&changed)?;
        let bytes = w.into_inner()?;
        let encode = t.elapsed();
        std::hint::black_box(bytes);
        let name = table.strip_prefix(root).unwrap_or(&table).to_string_lossy().replace('/', ".");
        out.push(TableFloor {
            table: name,
            rows_written: new.num_rows() as u64,
            rows_changed: changed.num_rows() as u64,
            encode,
        });
    }
    out.sort_by_key(|t| std::cmp::Reverse(t.encode));
    Ok(out)
}
