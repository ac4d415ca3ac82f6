//! `weir parity`: the legacy mart in PostgreSQL against the mart in the lake.
//!
//! Both sides render every value in one canonical text encoding (integers and numerics in
//! PostgreSQL's text form at their scale, text and char(n) byte for byte, dates as
//! YYYY-MM-DD, timestamps as µs since the epoch, booleans as t/f, NULL distinct from every
//! value), hash `listing_id ␟ value` with md5 and add the first 64 bits of every row's hash
//! (mod 2^64): an order-independent checksum per column. PostgreSQL computes its side in
//! SQL, DataFusion the lake's. Columns whose checksums differ are then compared row by row.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, TimeUnit};
use tokio_postgres::Client;
use weir_lake::Lake;
use weir_postgres::PgError;

use crate::jobs::Jobs;
use crate::session::LakeSession;
use crate::{DeriveError, df_err};

#[derive(Debug, Clone)]
pub struct ParityOptions {
    pub slug: String,
    /// The legacy table (default `ads_<slug>`).
    pub legacy_table: Option<String>,
    /// How many differing rows to show per column.
    pub show: usize,
    /// Both sides must have been built as of this instant (µs); without it they must agree.
    pub expect_as_of: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct ColumnParity {
    pub name: String,
    pub legacy_type: String,
    pub lake_type: String,
    pub type_ok: bool,
    pub legacy_sum: u64,
    pub lake_sum: u64,
    /// (listing_id, legacy value, lake value) of the first differing rows.
    pub diffs: Vec<(i64, String, String)>,
}

#[derive(Debug, Clone)]
pub struct ParityReport {
    pub legacy_table: String,
    pub lake_table: String,
    pub legacy_rows: u64,
    pub lake_rows: u64,
    /// The as-of instants the two sides were built with (µs), when recorded.
    pub legacy_as_of: Option<i64>,
    pub lake_as_of: Option<i64>,
    pub expect_as_of: Option<i64>,
    /// Column names in order, when they differ between the two sides.
    pub column_mismatch: Option<(Vec<String>, Vec<String>)>,
    pub columns: Vec<ColumnParity>,
    pub only_legacy: Vec<i64>,
    pub only_lake: Vec<i64>,
}

impl ParityReport {
    pub fn as_of_ok(&self) -> bool {
        match self.expect_as_of {
            Some(t) => self.legacy_as_of == Some(t) && self.lake_as_of == Some(t),
            None => self.legacy_as_of.is_none() || self.lake_as_of.is_none() || self.legacy_as_of == self.lake_as_of,
        }
    }

    pub fn identical(&self) -> bool {
        self.as_of_ok()
            && self.legacy_rows == self.lake_rows
            && self.column_mismatch.is_none()
            && self.only_legacy.is_empty()
            && self.only_lake.is_empty()
            && self.columns.iter().all(|c| c.type_ok && c.legacy_sum == c.lake_sum)
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "parity {} (PostgreSQL) vs {} (lake)", self.legacy_table, self.lake_table);
        let _ = writeln!(o, "  rows: {} vs {}", self.legacy_rows, self.lake_rows);
        let show = |t: Option<i64>| {
            t.and_then(chrono::DateTime::from_timestamp_micros)
                .map_or("(not recorded)".to_string(), |t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        };
        let _ = writeln!(
            o,
            "  as-of: {} vs {}{}{}",
            show(self.legacy_as_of),
            show(self.lake_as_of),
            self.expect_as_of.map(|t| format!(" (expected {})", show(Some(t)))).unwrap_or_default(),
            if self.as_of_ok() { "" } else { "  MISMATCH" }
        );
        if let Some((a, b)) = &self.column_mismatch {
            let _ = writeln!(o, "  columns differ:\n    legacy: {}\n    lake:   {}", a.join(", "), b.join(", "));
        }
        for (what, ids) in [("only in the legacy table", &self.only_legacy), ("only in the lake", &self.only_lake)] {
            if !ids.is_empty() {
                let shown: Vec<String> = ids.iter().take(10).map(i64::to_string).collect();
                let _ = writeln!(
                    o,
                    "  {} listing_ids {what}: {}{}",
                    ids.len(),
                    shown.join(", "),
                    if ids.len() > 10 { ", …" } else { "" }
                );
            }
        }
        let width = self.columns.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &self.columns {
            let verdict = if !c.type_ok {
                format!("TYPE {} vs {}", c.legacy_type, c.lake_type)
            } else if c.legacy_sum == c.lake_sum {
                "identical".to_string()
            } else {
                "DIFFERENT".to_string()
            };
            let _ = writeln!(o, "  {:width$}  {:<24}  {:016x}  {verdict}", c.name, c.legacy_type, c.lake_sum);
            for (id, a, b) in &c.diffs {
                let _ = writeln!(o, "      listing_id {id}: legacy {a} | lake {b}");
            }
        }
        let _ = write!(o, "verdict: {}", if self.identical() { "IDENTICAL" } else { "DIFFERENT" });
        o
    }
}

/// PostgreSQL's canonical text of a column of type `ty` (format_type).
fn pg_canon(col: &str, ty: &str) -> String {
    let c = format!("\"{col}\"");
    if ty.starts_with("timestamp") {
        format!("((extract(epoch FROM {c}) * 1000000)::bigint)::text")
    } else if ty == "date" {
        format!("to_char({c}, 'YYYY-MM-DD')")
    } else if ty == "boolean" {
        format!("CASE WHEN {c} THEN 't' ELSE 'f' END")
    } else if ty.starts_with("character(") {
        // The padded value, as the type's output function shows it (a cast to text trims).
        format!("format('%s', {c})")
    } else {
        format!("{c}::text")
    }
}

/// DataFusion's canonical text of a lake column.
fn lake_canon(col: &str, ty: &DataType) -> String {
    let c = format!("\"{col}\"");
    match ty {
        DataType::Timestamp(_, _) => format!("CAST(CAST({c} AS BIGINT) AS VARCHAR)"),
        DataType::Boolean => format!("CASE WHEN {c} THEN 't' ELSE 'f' END"),
        _ => format!("CAST({c} AS VARCHAR)"),
    }
}

/// The PostgreSQL type a lake column must have to be the same column.
fn pg_type_of(ty: &DataType) -> Vec<String> {
    match ty {
        DataType::Int16 => vec!["smallint".into()],
        DataType::Int32 => vec!["integer".into()],
        DataType::Int64 => vec!["bigint".into()],
        DataType::Boolean => vec!["boolean".into()],
        DataType::Date32 => vec!["date".into()],
        DataType::Float32 => vec!["real".into()],
        DataType::Float64 => vec!["double precision".into()],
        DataType::Decimal128(p, s) => vec![format!("numeric({p},{s})")],
        DataType::Timestamp(TimeUnit::Microsecond, Some(tz)) if tz.as_ref() == "UTC" => {
            vec!["timestamp with time zone".into()]
        }
        DataType::Timestamp(TimeUnit::Microsecond, None) => vec!["timestamp without time zone".into()],
        // Text, and char(n) whose padded value the lake stores as text.
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => vec!["text".into(), "character".into()],
        other => vec![format!("({other})")],
    }
}

fn type_matches(pg: &str, lake: &DataType) -> bool {
    pg_type_of(lake).iter().any(|t| pg == t || (t == "character" && pg.starts_with("character(")))
}

const MOD64: &str = "18446744073709551616::numeric";

fn row_hash_pg(canon: &str) -> String {
    format!(
        "('x' || left(md5(listing_id::text || chr(31) || coalesce('V' || {canon}, 'N')), 16))::bit(64)::bigint::numeric"
    )
}

fn row_hash_lake(canon: &str) -> String {
    format!("md5(CAST(listing_id AS VARCHAR) || chr(31) || coalesce('V' || {canon}, 'N'))")
}

/// Compares the lake's `gold.ads_<slug>` (as `jobs` define it: a stored table or a view over
/// stored rows) with the legacy table in PostgreSQL.
pub async fn parity(pg: &Client, lake: &Lake, jobs: &Jobs, opts: &ParityOptions) -> Result<ParityReport, DeriveError> {
    let slug = weir_core::validate_slug(&opts.slug).map_err(|e| DeriveError::Parity(e.to_string()))?;
    let legacy = opts.legacy_table.clone().unwrap_or_else(|| format!("ads_{slug}"));
    let lake_name = format!("gold.ads_{slug}");

    // The legacy side: columns, as-of from the build's comment, counts and checksums.
    let cols = pg
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
             FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&format!("public.\"{legacy}\"")],
        )
        .await
        .map_err(PgError::query(format!("reading the columns of {legacy}")))?;
    if cols.is_empty() {
        // With the default name, a slug the source's makes table lacks is the likelier mistake.
        let mut known: Option<Vec<String>> = None;
        if opts.legacy_table.is_none()
            && pg
                .query_one("SELECT to_regclass('public.makes') IS NOT NULL", &[])
                .await
                .map_err(PgError::query("looking for table makes"))?
                .get::<_, bool>(0)
        {
            let rows = pg
                .query("SELECT slug::text FROM public.makes ORDER BY make_id", &[])
                .await
                .map_err(PgError::query("reading the slugs of makes"))?;
            known = Some(rows.iter().map(|r| r.get(0)).collect());
        }
        return Err(DeriveError::Parity(match known {
            Some(slugs) if !slugs.iter().any(|s| s == slug) => {
                format!("unknown make slug {slug:?}; known slugs: {}", slugs.join(", "))
            }
            Some(_) => format!(
                "the legacy table {legacy} does not exist in PostgreSQL (`weir legacy build --make {slug} --as-of …` builds it)"
            ),
            None => format!("the legacy table {legacy} does not exist in PostgreSQL"),
        }));
    }
    let legacy_cols: Vec<(String, String)> = cols.iter().map(|r| (r.get(0), r.get(1))).collect();
    if !legacy_cols.iter().any(|(n, _)| n == "listing_id") {
        return Err(DeriveError::Parity(format!("{legacy} has no listing_id column")));
    }
    let comment: Option<String> = pg
        .query_one("SELECT obj_description(to_regclass($1), 'pg_class')", &[&format!("public.\"{legacy}\"")])
        .await
        .map_err(PgError::query(format!("reading the comment of {legacy}")))?
        .get(0);
    let legacy_as_of = comment
        .and_then(|c| c.split("as_of=").nth(1).map(|s| s.trim().to_string()))
        .and_then(|s| weir_core::parse_timestamp(&s).ok())
        .map(|t| t.timestamp_micros());

    let mut session = LakeSession::empty()?;
    let Some(stored) = session.register_output(lake, jobs, &lake_name).await? else {
        return Err(DeriveError::Parity(format!(
            "{lake_name} is not in the lake: run `weir derive --make {slug}` first"
        )));
    };
    let table = session.table(lake, &stored).await?;
    // A table partitioned by make (silver.ads_base) records each make's partition rebuilt
    // alone on its own.
    let make_id = match session.versions.contains_key(crate::session::MAKES) {
        true => crate::session::read_makes(&session.ctx).await?.into_iter().find(|(s, _)| s == slug).map(|m| m.1),
        false => None,
    };
    let lake_as_of = weir_lake::last_commit_info(&table, &stored)
        .await?
        .and_then(|m| crate::run::recorded_as_of(m.get(crate::run::STATE_KEY), make_id));
    let df = session.ctx.table(lake_name.as_str()).await.map_err(df_err(format!("reading {lake_name}")))?;
    let lake_cols: Vec<(String, DataType)> =
        df.schema().fields().iter().map(|f| (f.name().clone(), f.data_type().clone())).collect();

    let mut report = ParityReport {
        legacy_table: legacy.clone(),
        lake_table: lake_name.clone(),
        legacy_rows: 0,
        lake_rows: 0,
        legacy_as_of,
        lake_as_of,
        expect_as_of: opts.expect_as_of,
        column_mismatch: None,
        columns: vec![],
        only_legacy: vec![],
        only_lake: vec![],
    };
    let names_a: Vec<String> = legacy_cols.iter().map(|c| c.0.clone()).collect();
    let names_b: Vec<String> = lake_cols.iter().map(|c| c.0.clone()).collect();
    if names_a != names_b {
        report.column_mismatch = Some((names_a, names_b));
    }
    let common: Vec<(String, String, DataType)> = legacy_cols
        .iter()
        .filter_map(|(n, t)| lake_cols.iter().find(|(m, _)| m == n).map(|(_, d)| (n.clone(), t.clone(), d.clone())))
        .collect();

    // PostgreSQL: one pass, one sum per column.
    let sums: Vec<String> = common
        .iter()
        .map(|(n, t, _)| {
            format!("mod(mod(coalesce(sum({}), 0), {MOD64}) + {MOD64}, {MOD64})::text", row_hash_pg(&pg_canon(n, t)))
        })
        .collect();
    let sql = format!("SELECT count(*), {} FROM \"{legacy}\"", sums.join(",\n  "));
    let row = pg.query_one(&sql, &[]).await.map_err(PgError::query(format!("checksumming {legacy}")))?;
    report.legacy_rows = row.get::<_, i64>(0) as u64;
    let legacy_sums: Vec<u64> = (1..=common.len())
        .map(|i| row.get::<_, String>(i).parse::<u128>().map(|v| v as u64).unwrap_or_default())
        .collect();

    // The lake: DataFusion renders and hashes, the sums are folded here.
    let hashes: Vec<String> = common.iter().map(|(n, _, d)| row_hash_lake(&lake_canon(n, d))).collect();
    let sql = format!("SELECT {} FROM {lake_name}", hashes.join(",\n  "));
    let mut stream = session
        .ctx
        .sql(&sql)
        .await
        .map_err(df_err(format!("checksumming {lake_name}")))?
        .execute_stream()
        .await
        .map_err(df_err(format!("checksumming {lake_name}")))?;
    let mut lake_sums = vec![0u64; common.len()];
    let mut lake_rows = 0u64;
    while let Some(batch) = futures::StreamExt::next(&mut stream).await {
        let batch = batch.map_err(df_err(format!("checksumming {lake_name}")))?;
        lake_rows += batch.num_rows() as u64;
        for (i, col) in batch.columns().iter().enumerate() {
            let col = arrow::compute::cast(col, &DataType::Utf8).map_err(|e| df_err("hashing")(e.into()))?;
            let col = col.as_string::<i32>();
            for v in col.iter().flatten() {
                lake_sums[i] = lake_sums[i].wrapping_add(u64::from_str_radix(&v[..16], 16).unwrap_or_default());
            }
        }
    }
    report.lake_rows = lake_rows;

    // Key sets.
    let legacy_ids: Vec<i64> = pg
        .query(&format!("SELECT listing_id FROM \"{legacy}\" ORDER BY 1"), &[])
        .await
        .map_err(PgError::query(format!("reading {legacy}")))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lake_ids = lake_column(&session, &lake_name, "CAST(listing_id AS VARCHAR)").await?;
    let lake_ids: Vec<i64> = lake_ids.keys().copied().collect();
    report.only_legacy = minus(&legacy_ids, &lake_ids);
    report.only_lake = minus(&lake_ids, &legacy_ids);

    for (i, (name, pg_ty, lake_ty)) in common.iter().enumerate() {
        let mut c = ColumnParity {
            name: name.clone(),
            legacy_type: pg_ty.clone(),
            lake_type: lake_ty.to_string(),
            type_ok: type_matches(pg_ty, lake_ty),
            legacy_sum: legacy_sums[i],
            lake_sum: lake_sums[i],
            diffs: vec![],
        };
        if c.legacy_sum != c.lake_sum && opts.show > 0 {
            let canon = pg_canon(name, pg_ty);
            let a: BTreeMap<i64, Option<String>> = pg
                .query(&format!("SELECT listing_id, {canon} FROM \"{legacy}\""), &[])
                .await
                .map_err(PgError::query(format!("reading {legacy}.{name}")))?
                .iter()
                .map(|r| (r.get::<_, i64>(0), r.get::<_, Option<String>>(1)))
                .collect();
            let b = lake_column(&session, &lake_name, &lake_canon(name, lake_ty)).await?;
            let show = |v: Option<&Option<String>>| match v {
                None => "(no row)".to_string(),
                Some(None) => "NULL".to_string(),
                Some(Some(s)) => format!("{s:?}"),
            };
            for id in a.keys().chain(b.keys()).copied().collect::<std::collections::BTreeSet<i64>>() {
                if a.get(&id) != b.get(&id) {
                    c.diffs.push((id, show(a.get(&id)), show(b.get(&id))));
                    if c.diffs.len() >= opts.show {
                        break;
                    }
                }
            }
        }
        report.columns.push(c);
    }
    Ok(report)
}

fn minus(a: &[i64], b: &[i64]) -> Vec<i64> {
    let b: std::collections::BTreeSet<i64> = b.iter().copied().collect();
    a.iter().copied().filter(|x| !b.contains(x)).collect()
}

/// listing_id → canonical value of one expression over the lake table.
async fn lake_column(
    session: &LakeSession,
    table: &str,
    canon: &str,
) -> Result<BTreeMap<i64, Option<String>>, DeriveError> {
    let batches = session
        .ctx
        .sql(&format!("SELECT listing_id AS k, {canon} AS v FROM {table}"))
        .await
        .map_err(df_err(format!("reading {table}")))?
        .collect()
        .await
        .map_err(df_err(format!("reading {table}")))?;
    let mut out = BTreeMap::new();
    for b in batches {
        let ids = arrow::compute::cast(b.column(0), &DataType::Int64).map_err(|e| df_err("reading ids")(e.into()))?;
        let ids = ids.as_primitive::<arrow::datatypes::Int64Type>();
        let vals =
            arrow::compute::cast(b.column(1), &DataType::Utf8).map_err(|e| df_err("reading values")(e.into()))?;
        let vals = vals.as_string::<i32>();
        for i in 0..b.num_rows() {
            out.insert(ids.value(i), if vals.is_null(i) { None } else { Some(vals.value(i).to_string()) });
        }
    }
    Ok(out)
}
