//! Independent comparison of a landed Delta table with PostgreSQL: every row of every column
//! rendered to one canonical text on both sides (PostgreSQL's own text functions there,
//! Arrow values here), sorted, compared. Nothing of the backfill's decoder is reused.

use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type,
    TimestampMicrosecondType,
};
use datafusion::prelude::SessionContext;
use weir_lake::Lake;

pub const NULL: &str = "∅";

/// The table's columns (name, typname) in order.
pub async fn pg_columns(c: &tokio_postgres::Client, table: &str) -> Vec<(String, String)> {
    crate::common::column_info(c, table).await.into_iter().map(|(n, t, _)| (n, t)).collect()
}

/// Canonical rows of `SELECT … FROM table [where]`, sorted.
pub async fn pg_rows(c: &tokio_postgres::Client, table: &str, filter: &str) -> Vec<Vec<String>> {
    let cols = pg_columns(c, table).await;
    let exprs: Vec<String> = cols
        .iter()
        .map(|(n, t)| match t.as_str() {
            "date" => format!("(\"{n}\" - date '1970-01-01')::text"),
            "timestamptz" | "timestamp" => format!("(extract(epoch from \"{n}\") * 1000000)::bigint::text"),
            "float4" => format!("encode(float4send(\"{n}\"), 'hex')"),
            "float8" => format!("encode(float8send(\"{n}\"), 'hex')"),
            "bytea" => format!("encode(\"{n}\", 'hex')"),
            _ => format!("\"{n}\"::text"),
        })
        .collect();
    // char(n) keeps its padding: bpchar::text strips it, concat() uses the padded output form.
    let exprs: Vec<String> =
        cols.iter()
            .zip(exprs)
            .map(|((n, t), e)| {
                if t == "bpchar" { format!("CASE WHEN \"{n}\" IS NULL THEN NULL ELSE concat(\"{n}\") END") } else { e }
            })
            .collect();
    let sql = format!("SELECT {} FROM \"{table}\" {filter}", exprs.join(", "));
    let mut rows: Vec<Vec<String>> = c
        .query(&sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| (0..cols.len()).map(|i| r.get::<_, Option<String>>(i).unwrap_or_else(|| NULL.to_string())).collect())
        .collect();
    rows.sort();
    rows
}

/// Canonical rows of the Delta table at `rel`, source columns only (`columns` order), sorted.
pub async fn lake_rows(lake: &Lake, rel: &str, columns: &[(String, String)]) -> Vec<Vec<String>> {
    let table = weir_lake::open_table(lake, rel).await.unwrap();
    assert!(table.version().is_some(), "{rel} is not a Delta table");
    let ctx = SessionContext::new();
    table.update_datafusion_session(&ctx.state()).unwrap();
    ctx.register_table("t", table.table_provider().await.unwrap()).unwrap();
    let select: Vec<String> = columns.iter().map(|(n, _)| format!("\"{n}\"")).collect();
    let batches = ctx.sql(&format!("SELECT {} FROM t", select.join(", "))).await.unwrap().collect().await.unwrap();
    let mut rows = Vec::new();
    for b in batches {
        let cols: Vec<Arc<dyn Array>> = b.columns().iter().map(normalize).collect();
        for i in 0..b.num_rows() {
            rows.push(cols.iter().map(|a| canon(a.as_ref(), i)).collect());
        }
    }
    rows.sort();
    rows
}

fn normalize(a: &Arc<dyn Array>) -> Arc<dyn Array> {
    match a.data_type() {
        DataType::Utf8View | DataType::LargeUtf8 | DataType::Dictionary(_, _) => {
            arrow::compute::cast(a, &DataType::Utf8).unwrap()
        }
        DataType::BinaryView | DataType::LargeBinary => arrow::compute::cast(a, &DataType::Binary).unwrap(),
        _ => a.clone(),
    }
}

fn canon(a: &dyn Array, i: usize) -> String {
    if a.is_null(i) {
        return NULL.to_string();
    }
    match a.data_type() {
        DataType::Int16 => a.as_primitive::<Int16Type>().value(i).to_string(),
        DataType::Int32 => a.as_primitive::<Int32Type>().value(i).to_string(),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(i).to_string(),
        DataType::Float32 => hex(&a.as_primitive::<Float32Type>().value(i).to_bits().to_be_bytes()),
        DataType::Float64 => hex(&a.as_primitive::<Float64Type>().value(i).to_bits().to_be_bytes()),
        DataType::Boolean => a.as_boolean().value(i).to_string(),
        DataType::Utf8 => a.as_string::<i32>().value(i).to_string(),
        DataType::Binary => hex(a.as_binary::<i32>().value(i)),
        DataType::Date32 => a.as_primitive::<Date32Type>().value(i).to_string(),
        DataType::Timestamp(_, _) => a.as_primitive::<TimestampMicrosecondType>().value(i).to_string(),
        DataType::Decimal128(_, s) => decimal(a.as_primitive::<Decimal128Type>().value(i), *s),
        other => panic!("no canonical form for {other}"),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// i128 at `scale` as PostgreSQL prints numeric(p, scale).
pub fn decimal(v: i128, scale: i8) -> String {
    let neg = v < 0;
    let digits = v.unsigned_abs().to_string();
    let s = scale as usize;
    let body = if s == 0 {
        digits
    } else if digits.len() > s {
        format!("{}.{}", &digits[..digits.len() - s], &digits[digits.len() - s..])
    } else {
        format!("0.{}{}", "0".repeat(s - digits.len()), digits)
    };
    if neg { format!("-{body}") } else { body }
}

/// Asserts the landed table equals PostgreSQL's rows (filtered), with a readable diff.
pub async fn assert_table_matches(c: &tokio_postgres::Client, lake: &Lake, table: &str, expected: Vec<Vec<String>>) {
    let cols = pg_columns(c, table).await;
    let got = lake_rows(lake, &format!("bronze/{table}"), &cols).await;
    if got != expected {
        let missing: Vec<_> = expected.iter().filter(|r| !got.contains(r)).take(3).collect();
        let extra: Vec<_> = got.iter().filter(|r| !expected.contains(r)).take(3).collect();
        panic!(
            "{table}: lake has {} rows, PostgreSQL {}; missing from the lake (first 3): {missing:?}; not in PostgreSQL (first 3): {extra:?}",
            got.len(),
            expected.len()
        );
    }
}

#[test]
fn decimals_print_like_postgres() {
    assert_eq!(decimal(12_345, 2), "123.45");
    assert_eq!(decimal(-1_235, 2), "-12.35");
    assert_eq!(decimal(5, 2), "0.05");
    assert_eq!(decimal(0, 2), "0.00");
    assert_eq!(decimal(7, 0), "7");
}
