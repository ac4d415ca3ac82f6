//! `weir serve` with real Flight SQL clients from PyPI (the ADBC Flight SQL driver and
//! pyarrow.flight): the mart reads back with PostgreSQL's rows, prepared statements take
//! parameters, the catalog lists every table, credentials are enforced, a new Delta version
//! shows up without a restart, and the per-query memory limit gives a clear error.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use serde_json::Value;
use weir_core::{LakeLocation, S3Settings};
use weir_ingest::{BackfillOptions, Metrics, SlotMode};
use weir_lake::Lake;

use crate::common;

pub const AS_OF: &str = "2026-07-01T00:00:00Z";

pub struct Server {
    child: Child,
    pub port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn serve(lake_dir: &std::path::Path, config: &std::path::Path, extra: &[&str]) -> Server {
    serve_logged(lake_dir, config, extra, None)
}

/// [`serve`] with the server's log (debug level for the Flight crate) in `log`.
pub fn serve_logged(
    lake_dir: &std::path::Path,
    config: &std::path::Path,
    extra: &[&str],
    log: Option<&std::path::Path>,
) -> Server {
    serve_at(lake_dir, config, extra, log, 0)
}

/// [`serve_logged`] on a given port (0: a free one).
pub fn serve_at(
    lake_dir: &std::path::Path,
    config: &std::path::Path,
    extra: &[&str],
    log: Option<&std::path::Path>,
    port: u16,
) -> Server {
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(common::weir_bin())
        .current_dir(env!("CARGO_MANIFEST_DIR").to_string() + "/../..")
        .args(["--config", config.to_str().unwrap(), "serve", "--addr", &addr, "--refresh-ms", "100"])
        .args(["--lake", &format!("file://{}", lake_dir.display())])
        .args(extra)
        .env("WEIR_LOG", "warn,weir_flight=debug")
        .stdout(Stdio::piped())
        .stderr(match log {
            Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
            None => Stdio::null(),
        })
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    Server { child, port }
}

fn client(mode: &str, port: u16, arg: Option<&str>) -> Value {
    let mut cmd = Command::new(common::python());
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/e2e/flight_client.py")).arg(mode).arg(port.to_string());
    if let Some(a) = arg {
        cmd.arg(a);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{mode}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

pub async fn derive_vw(lake: &Lake) {
    let (bronze, jobs) = (common::repo_bronze(), common::repo_jobs());
    let opts = weir_derive::DeriveOptions {
        job: Some("ads".into()),
        makes: weir_derive::MakeSelection::One("vw".into()),
        as_of_micros: weir_core::parse_timestamp(AS_OF).unwrap().timestamp_micros(),
        full: false,
        target_file_bytes: 64 << 20,
    };
    weir_derive::derive(lake, &jobs, &bronze, &opts, |_| {}).await.unwrap();
}

pub async fn backfill(url: &str, lake: &Lake, only: Option<&[String]>) {
    let sources = common::repo_sources();
    let opts = BackfillOptions { force: true, slot: SlotMode::NoSlot, ..Default::default() };
    weir_ingest::backfill(url, lake, &sources.select(only).unwrap(), &opts, Arc::new(Metrics::default()))
        .await
        .unwrap();
}

/// (listing_id, title, price_last_eur, last_price_at, is_active, days_online, country) from PostgreSQL.
async fn pg_rows(c: &tokio_postgres::Client) -> Vec<Value> {
    c.query(
        "SELECT json_build_array(listing_id, title, price_last_eur::text,
                to_char(last_price_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+00:00',
                is_active, days_online, country)::text
         FROM ads_vw ORDER BY listing_id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
    .collect()
}

/// Python renders a timestamp at a whole second without the fraction; so does this.
fn normalize(rows: &[Value]) -> Vec<Value> {
    rows.iter()
        .map(|r| {
            let mut r = r.clone();
            if let Some(ts) = r[3].as_str() {
                r[3] = Value::String(ts.replace(".000000+00:00", "+00:00"));
            }
            r
        })
        .collect()
}

/// A generated marketplace (SF 0.05), its lake with gold.ads_vw derived, the legacy ads_vw
/// built as of [`AS_OF`], and a weir.toml with one Flight user (analyst / s3cret).
pub struct Served {
    pub _pg: weir_testkit::PgCluster,
    pub url: String,
    pub dir: tempfile::TempDir,
    pub lake: Lake,
    pub c: tokio_postgres::Client,
    pub config: std::path::PathBuf,
}

pub async fn served_vw(seed: u64) -> Served {
    let (_pg, url) = common::marketplace(0.05, seed).await;
    let dir = tempfile::tempdir().unwrap();
    let lake =
        Lake::open(LakeLocation::Local { root: dir.path().join("lake") }, &S3Settings::default(), false).unwrap();
    backfill(&url, &lake, None).await;
    let mut c = common::client(&url).await;
    weir_synth::build_legacy_mart(&mut c, "vw", weir_core::parse_timestamp(AS_OF).unwrap()).await.unwrap();
    derive_vw(&lake).await;
    let config = dir.path().join("weir.toml");
    std::fs::write(&config, "[serve]\nusers = [{ name = \"analyst\", password = \"s3cret\" }]\n").unwrap();
    Served { _pg, url, dir, lake, c, config }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flight_sql_clients_read_the_marts() {
    let Served { _pg, url, dir, lake, c, config } = served_vw(11).await;
    let server = serve(&dir.path().join("lake"), &config, &[]);
    let r = client("read", server.port, None);

    // The mart, through both clients, row for row as in PostgreSQL.
    let want = normalize(&pg_rows(&c).await);
    assert!(want.len() > 100, "{}", want.len());
    for key in ["adbc_rows", "pyarrow_rows"] {
        let got = normalize(r[key].as_array().unwrap());
        assert_eq!(got.len(), want.len(), "{key}");
        let diff: Vec<_> = got.iter().zip(&want).filter(|(a, b)| a != b).take(3).collect();
        assert!(diff.is_empty(), "{key}: {diff:?}");
    }
    assert_eq!(r["adbc_types"]["price_last_eur"], "decimal128(12, 2)");
    assert_eq!(r["adbc_types"]["last_price_at"], "timestamp[us, tz=UTC]");
    assert_eq!(r["adbc_types"]["registration_year"], "int16");
    // A prepared statement with parameters.
    let n = common::scalar_i64(&c, "SELECT count(*) FROM ads_vw WHERE listing_id <= 500 AND country = 'DE'").await;
    assert_eq!(r["prepared_count"].as_i64(), Some(n));
    // The catalog: every layer, the views, the bare mart name.
    for key in ["adbc_tables", "pyarrow_tables"] {
        let tables: Vec<&str> = r[key].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        for t in [
            "bronze.price_log",
            "silver.listing_price",
            "silver.listing",
            "silver.dealer",
            "silver.ads_base",
            "gold.ads_vw",
            "public.ads_vw",
        ] {
            assert!(tables.contains(&t), "{key}: {t} missing from {tables:?}");
        }
    }
    // Errors reach the client with the server's message; credentials are enforced.
    assert!(r["bad_sql_error"].as_str().unwrap_or_default().contains("no_such_column"), "{r}");
    let wrong = r["wrong_password_error"].as_str().unwrap_or_default().to_lowercase();
    assert!(wrong.contains("unauthenticated") && wrong.contains("wrong user or password"), "{wrong}");
    let none = r["no_token_error"].as_str().unwrap_or_default().to_lowercase();
    assert!(none.contains("authentication required"), "{none}");

    // A new Delta version is visible without a restart.
    let id = common::scalar_i64(&c, "SELECT min(listing_id) FROM ads_vw WHERE listing_id > 20").await;
    c.execute("UPDATE listings SET title = 'Über-neu ✨ \t tab' WHERE listing_id = $1", &[&id]).await.unwrap();
    backfill(&url, &lake, Some(&["listings".to_string()])).await;
    derive_vw(&lake).await;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let t = client("title", server.port, Some(&id.to_string()));
    assert_eq!(t["title"], "Über-neu ✨ \t tab");
    // So is a renamed model: the mart is a view joining silver.model, which the server holds
    // in memory per version.
    let renamed: String = c
        .query_one(
            "UPDATE models SET name = name || ' ✦', updated_at = now()
              WHERE model_id = (SELECT model_id FROM listings WHERE listing_id = $1) RETURNING name",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(t["model"], renamed.as_str());
    backfill(&url, &lake, Some(&["models".to_string()])).await;
    derive_vw(&lake).await;
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(client("title", server.port, Some(&id.to_string()))["model"], renamed.as_str());
    drop(server);

    // Cancellation: a client that cancels its DoGet stops the query on the server (logged),
    // and the server keeps serving.
    let log = dir.path().join("cancel.log");
    let cancelling = serve_logged(&dir.path().join("lake"), &config, &[], Some(&log));
    let r = client("cancel", cancelling.port, None);
    assert!(r["first_batch_rows"].as_u64().unwrap_or(0) > 0, "{r}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let cancelled = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("query cancelled by the client") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(cancelled.contains("query cancelled by the client") && cancelled.contains("CROSS JOIN"), "{cancelled}");
    assert_eq!(client("title", cancelling.port, Some(&id.to_string()))["title"], "Über-neu ✨ \t tab");
    drop(cancelling);

    // The per-query memory limit: a clear error, not a crash; the server keeps serving.
    let small = serve(&dir.path().join("lake"), &config, &["--memory-limit-mb", "1"]);
    let m = client("memory", small.port, None);
    let err = m["memory_error"].as_str().unwrap_or_default();
    assert!(err.contains("memory limit of 1 MiB"), "{m}");
    let again = client("title", small.port, Some(&id.to_string()));
    assert_eq!(again["title"], "Über-neu ✨ \t tab");

    drop(small);

    // TLS: a self-signed certificate (openssl), trusted by the client.
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let tls_config = dir.path().join("tls.toml");
    std::fs::write(
        &tls_config,
        format!(
            "[serve]\nusers = [{{ name = \"analyst\", password = \"s3cret\" }}]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let tls = serve(&dir.path().join("lake"), &tls_config, &[]);
    let t = client("tls", tls.port, Some(cert.to_str().unwrap()));
    assert_eq!(t["count"].as_i64(), Some(want.len() as i64), "{t}");
    drop(tls);

    // No way to connect configured: refused at start, naming the settings.
    std::fs::write(&config, "[serve]\n").unwrap();
    let out = Command::new(common::weir_bin())
        .args(["--config", config.to_str().unwrap(), "serve", "--addr", "127.0.0.1:0"])
        .args(["--lake", &format!("file://{}", dir.path().join("lake").display())])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("serve.users") && stderr.lines().count() == 1, "{stderr}");
}
