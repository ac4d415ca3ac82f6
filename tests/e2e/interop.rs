//! Interop: the Python `deltalake` package (PyPI) reads every landed table, on both lake
//! kinds, with the source's row count and the exact types.

use std::sync::Arc;

use weir_ingest::{BackfillOptions, Metrics};

use crate::backfill::lakes;
use crate::common;

/// The pyarrow type a PostgreSQL column must arrive as.
fn expected_type(format_type: &str) -> String {
    if let Some(ps) = format_type.strip_prefix("numeric(").and_then(|r| r.strip_suffix(')')) {
        let (p, s) = ps.split_once(',').unwrap();
        return format!("decimal128({p}, {s})");
    }
    match format_type {
        "smallint" => "int16",
        "integer" => "int32",
        "bigint" => "int64",
        "text" => "string",
        t if t.starts_with("character") => "string",
        "date" => "date32[day]",
        "timestamp with time zone" => "timestamp[us, tz=UTC]",
        "boolean" => "bool",
        other => panic!("no expectation for {other}"),
    }
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_deltalake_reads_every_table() {
    let (lakes, server, _dir) = lakes().await;
    let (_pg, url) = common::marketplace(0.01, 21).await;
    let c = common::client(&url).await;
    let sources = common::repo_sources();
    for lake in &lakes {
        weir_ingest::backfill(&url, lake, &sources.tables, &BackfillOptions::default(), Arc::new(Metrics::default()))
            .await
            .unwrap();
        let uris: Vec<String> = sources
            .tables
            .iter()
            .map(|t| lake.table_url(&t.bronze_path()).as_str().trim_end_matches('/').to_string())
            .collect();
        let s3 = matches!(lake.location, weir_core::LakeLocation::S3 { .. }).then(|| server.endpoint());
        let stdout = python_read_output(&uris, s3.as_deref());
        for (t, uri) in sources.tables.iter().zip(&uris) {
            let rows = common::scalar_i64(&c, &format!("SELECT count(*) FROM {}", t.name)).await;
            let cols: Vec<(String, String)> = common::column_types(&c, &t.name).await;
            // Build the JSON fragment the script must print for this table.
            let mut schema: Vec<String> =
                cols.iter().map(|(n, ty)| format!("[\"{n}\", \"{}\"]", expected_type(ty))).collect();
            if let Some(p) = t.partition_column().filter(|p| !cols.iter().any(|(n, _)| n == p)) {
                schema.push(format!("[\"{p}\", \"string\"]"));
            }
            let want = format!("\"{uri}\": {{\"version\": 0, \"rows\": {rows}, \"schema\": [{}]", schema.join(", "));
            assert!(stdout.contains(&want), "{}: expected {want}\nin {stdout}", t.name);
        }
    }
}

/// What `read_delta.py` prints for the tables at `uris` (on the test S3 server at `s3`).
fn python_read_output(uris: &[String], s3: Option<&str>) -> String {
    let mut cmd = std::process::Command::new(common::python());
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/e2e/read_delta.py")).args(uris);
    if let Some(endpoint) = s3 {
        let opts = format!(
            r#"{{"AWS_ENDPOINT_URL": "{endpoint}", "AWS_REGION": "eu-central-1", "AWS_ACCESS_KEY_ID": "{}", "AWS_SECRET_ACCESS_KEY": "{}", "AWS_ALLOW_HTTP": "true"}}"#,
            weir_testkit::DEFAULT_ACCESS_KEY,
            weir_testkit::DEFAULT_SECRET_KEY
        );
        cmd.env("WEIR_STORAGE_OPTIONS", opts);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{uris:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `read_delta.py`'s report per table URI: version, rows, schema, partitions.
pub(crate) fn python_reads(uris: &[String], s3: Option<&str>) -> serde_json::Value {
    serde_json::from_str(&python_read_output(uris, s3)).expect("read_delta.py prints JSON")
}
