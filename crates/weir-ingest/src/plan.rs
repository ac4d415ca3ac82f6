//! Planning a backfill: the source schema (exact types, checked before anything is written)
//! and the chunks the workers copy.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;
use weir_postgres::{PgColumn, PgError, PgType};

use crate::IngestError;
use crate::sources::SourceTable;

/// Reads a table's columns from the catalog and maps every type, or fails naming the first
/// column Weir cannot land exactly.
pub async fn discover_columns(client: &Client, table: &str) -> Result<Vec<PgColumn>, IngestError> {
    let exists: bool = client
        .query_one("SELECT to_regclass(quote_ident($1)) IS NOT NULL", &[&table])
        .await
        .map_err(PgError::query(format!("looking up table {table}")))?
        .get(0);
    if !exists {
        return Err(IngestError::MissingTable { table: table.to_string() });
    }
    let rows = client
        .query(
            "SELECT a.attname::text, t.typname::text, a.atttypmod, format_type(a.atttypid, a.atttypmod), NOT a.attnotnull
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
             WHERE a.attrelid = quote_ident($1)::regclass AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&table],
        )
        .await
        .map_err(PgError::query(format!("reading the columns of {table}")))?;
    rows.iter()
        .map(|r| {
            let name: String = r.get(0);
            let ty = PgType::from_catalog(table, &name, r.get::<_, &str>(1), r.get(2), r.get::<_, &str>(3))?;
            Ok(PgColumn { name, ty, nullable: r.get(4) })
        })
        .collect()
}

/// One unit of work: a slice of a table by a range of its chunk column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub id: u32,
    /// Inclusive lower bound; None = unbounded (the first chunk).
    pub lo: Option<i64>,
    /// Exclusive upper bound; None = unbounded (the last chunk).
    pub hi: Option<i64>,
}

impl Chunk {
    /// The WHERE clause selecting this chunk (empty for a one-chunk table).
    pub fn predicate(&self, column: Option<&str>) -> String {
        let Some(c) = column else { return String::new() };
        match (self.lo, self.hi) {
            (None, None) => String::new(),
            (Some(lo), None) => format!(" WHERE \"{c}\" >= {lo}"),
            (None, Some(hi)) => format!(" WHERE \"{c}\" < {hi}"),
            (Some(lo), Some(hi)) => format!(" WHERE \"{c}\" >= {lo} AND \"{c}\" < {hi}"),
        }
    }
}

/// Splits [min, max] into `n` ranges; the first and last are open so that rows outside the
/// planned bounds (a resumed run under a newer snapshot) still land in exactly one chunk.
pub fn split_range(min: i64, max: i64, n: u32) -> Vec<Chunk> {
    let n = n.max(1);
    if n == 1 || max <= min {
        return vec![Chunk { id: 0, lo: None, hi: None }];
    }
    let span = (max as i128 - min as i128 + 1) as u128;
    let width = span.div_ceil(u128::from(n)).max(1) as i128;
    let mut chunks = Vec::new();
    let mut lo = min as i128;
    let mut id = 0;
    while lo <= max as i128 {
        let hi = lo + width;
        chunks.push(Chunk { id, lo: (id > 0).then_some(lo as i64), hi: (hi <= max as i128).then_some(hi as i64) });
        id += 1;
        lo = hi;
    }
    chunks
}

/// Rows per chunk when none is given: two chunks per worker, so that a slow chunk is
/// balanced by the other worker, but between 1 M and 10 M rows. A chunk writes a file per
/// partition it touches (price_log: one per month), so small chunks make small files, and
/// a chunk is the unit a resumed backfill redoes.
pub fn auto_chunk_rows(rows: u64, jobs: usize) -> u64 {
    (rows / (2 * jobs.max(1) as u64)).clamp(1_000_000, 10_000_000)
}

/// Plans the chunks of `table` (inside the snapshot transaction): about `chunk_rows` rows
/// each (default [`auto_chunk_rows`]), from the planner's row estimate and the chunk
/// column's bounds.
pub async fn plan_chunks(
    client: &Client,
    table: &SourceTable,
    columns: &[PgColumn],
    chunk_rows: Option<u64>,
    jobs: usize,
) -> Result<(Vec<Chunk>, u64), IngestError> {
    let estimate: f32 = client
        .query_one("SELECT reltuples FROM pg_class WHERE oid = quote_ident($1)::regclass", &[&table.name])
        .await
        .map_err(PgError::query(format!("estimating the size of {}", table.name)))?
        .get(0);
    let rows = if estimate > 0.0 {
        estimate as u64
    } else {
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM \"{}\"", table.name), &[])
            .await
            .map_err(PgError::query(format!("counting {}", table.name)))?
            .get(0);
        n as u64
    };
    let Some(col) = &table.chunk else { return Ok((vec![Chunk { id: 0, lo: None, hi: None }], rows)) };
    let ty = columns.iter().find(|c| &c.name == col).map(|c| c.ty).ok_or_else(|| IngestError::Config {
        message: format!("table {}: chunk column {col} does not exist", table.name),
    })?;
    if !matches!(ty, PgType::Int2 | PgType::Int4 | PgType::Int8) {
        return Err(IngestError::Config {
            message: format!("table {}: chunk column {col} must be an integer column", table.name),
        });
    }
    let row = client
        .query_one(&format!("SELECT min(\"{col}\")::bigint, max(\"{col}\")::bigint FROM \"{}\"", table.name), &[])
        .await
        .map_err(PgError::query(format!("reading the bounds of {}.{col}", table.name)))?;
    let (min, max): (Option<i64>, Option<i64>) = (row.get(0), row.get(1));
    let chunk_rows = chunk_rows.unwrap_or_else(|| auto_chunk_rows(rows, jobs));
    let n = rows.div_ceil(chunk_rows.max(1)).clamp(1, 10_000) as u32;
    Ok(match (min, max) {
        (Some(min), Some(max)) => (split_range(min, max, n), rows),
        _ => (vec![Chunk { id: 0, lo: None, hi: None }], rows),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_everything_once() {
        let chunks = split_range(1, 100, 4);
        assert_eq!(chunks.len(), 4);
        assert_eq!(chunks[0], Chunk { id: 0, lo: None, hi: Some(26) });
        assert_eq!(chunks[3], Chunk { id: 3, lo: Some(76), hi: None });
        // Every value, including ones outside [min, max], is in exactly one chunk.
        for v in -5..110i64 {
            let hits = chunks.iter().filter(|c| c.lo.is_none_or(|lo| v >= lo) && c.hi.is_none_or(|hi| v < hi)).count();
            assert_eq!(hits, 1, "{v}");
        }
        assert_eq!(split_range(5, 5, 8).len(), 1);
        assert_eq!(split_range(i64::MIN, i64::MAX, 3).len(), 3);
        assert_eq!(chunks[1].predicate(Some("id")), " WHERE \"id\" >= 26 AND \"id\" < 51");
        assert_eq!(chunks[0].predicate(None), "");
    }

    #[test]
    fn default_chunks_are_two_per_worker_within_bounds() {
        assert_eq!(auto_chunk_rows(9_899_669, 2), 2_474_917);
        assert_eq!(auto_chunk_rows(500_000, 2), 1_000_000);
        assert_eq!(auto_chunk_rows(3_000_000_000, 8), 10_000_000);
        assert_eq!(auto_chunk_rows(20_000_000, 0), 10_000_000);
    }
}
