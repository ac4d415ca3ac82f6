//! Backfill progress as counters, shared by the progress bars and the Prometheus endpoint.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Counters of one table.
#[derive(Debug, Default)]
pub struct TableCounters {
    pub rows: AtomicU64,
    /// Bytes of COPY data read from PostgreSQL.
    pub source_bytes: AtomicU64,
    /// Bytes of Parquet written.
    pub written_bytes: AtomicU64,
    pub files: AtomicU64,
    pub chunks_done: AtomicU64,
    pub chunks_total: AtomicU64,
    pub expected_rows: AtomicU64,
}

type Getter = fn(&TableCounters) -> &AtomicU64;

/// All tables' counters.
#[derive(Debug, Default)]
pub struct Metrics {
    tables: Mutex<BTreeMap<String, Arc<TableCounters>>>,
}

impl Metrics {
    pub fn table(&self, name: &str) -> Arc<TableCounters> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner()).entry(name.to_string()).or_default().clone()
    }

    /// The Prometheus text exposition format.
    pub fn render(&self) -> String {
        let tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let series: [(&str, &str, Getter); 7] = [
            ("weir_backfill_rows_total", "Rows landed", |c| &c.rows),
            ("weir_backfill_source_bytes_total", "COPY bytes read from PostgreSQL", |c| &c.source_bytes),
            ("weir_backfill_written_bytes_total", "Parquet bytes written", |c| &c.written_bytes),
            ("weir_backfill_files_total", "Parquet files written", |c| &c.files),
            ("weir_backfill_chunks_done", "Chunks finished", |c| &c.chunks_done),
            ("weir_backfill_chunks_total", "Chunks planned", |c| &c.chunks_total),
            ("weir_backfill_expected_rows", "Rows expected (planner estimate)", |c| &c.expected_rows),
        ];
        for (name, help, get) in series {
            let kind =
                if name.ends_with("_total") && name != "weir_backfill_chunks_total" { "counter" } else { "gauge" };
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (table, c) in tables.iter() {
                out.push_str(&format!("{name}{{table=\"{table}\"}} {}\n", get(c).load(Ordering::Relaxed)));
            }
        }
        out
    }
}

/// Serves `GET /metrics` on `addr` until the task is dropped. Returns the bound address.
pub async fn serve(
    addr: &str,
    metrics: Arc<Metrics>,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    serve_http(addr, Arc::new(move |path: &str| (path == "/metrics").then(|| metrics.render()))).await
}

/// What a tiny HTTP endpoint answers: the body for a path, None for 404.
pub type Handler = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Serves `GET <path>` with `handler` on `addr` until the task is dropped.
pub async fn serve_http(
    addr: &str,
    handler: Handler,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { continue };
            let handler = handler.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.strip_prefix("GET ").and_then(|r| r.split_whitespace().next()).unwrap_or("");
                let (status, body) = match handler(path) {
                    Some(body) => ("200 OK", body),
                    None => ("404 Not Found", "not found\n".to_string()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.table("listings").rows.fetch_add(42, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains("weir_backfill_rows_total{table=\"listings\"} 42\n"), "{text}");
        assert!(text.contains("# TYPE weir_backfill_rows_total counter"), "{text}");
    }
}
