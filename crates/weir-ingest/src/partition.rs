//! Delta partitions of source rows: derived partition columns (`<column>_month` =
//! 'YYYY-MM' in UTC), added to each batch for CDC's merges, and the backfill's split of a
//! batch into its partitions (grouped by a computed key, not sorted).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::compute::{cast, take_record_batch};
use arrow_array::builder::StringBuilder;
use arrow_array::cast::AsArray;
use arrow_array::types::{Date32Type, TimestampMicrosecondType};
use arrow_array::{Array, ArrayRef, RecordBatch, UInt32Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use delta_kernel::expressions::Scalar;
use deltalake::kernel::scalars::ScalarExt;

use crate::IngestError;
use crate::sources::{SourceTable, Transform};

/// The schema the Delta table gets: the source columns plus a derived partition column.
pub fn table_schema(source: &SourceTable, columns: SchemaRef) -> Result<SchemaRef, IngestError> {
    let Some(p) = &source.partition else { return Ok(columns) };
    let Some(col) = columns.fields().iter().find(|f| f.name() == &p.column) else {
        return Err(IngestError::Config {
            message: format!("table {}: partition column {} does not exist", source.name, p.column),
        });
    };
    match p.transform {
        None => Ok(columns),
        Some(Transform::Month) => {
            if !matches!(col.data_type(), DataType::Timestamp(_, _) | DataType::Date32) {
                return Err(IngestError::Config {
                    message: format!(
                        "table {}: transform month needs a timestamp or date column, {} is {}",
                        source.name,
                        p.column,
                        col.data_type()
                    ),
                });
            }
            let mut fields: Vec<Field> = columns.fields().iter().map(|f| f.as_ref().clone()).collect();
            fields.push(Field::new(source.partition_column().expect("partitioned"), DataType::Utf8, col.is_nullable()));
            Ok(Arc::new(Schema::new(fields)))
        }
    }
}

/// Adds the derived partition column to a decoded batch (no-op without a transform).
pub fn with_partition(
    source: &SourceTable,
    schema: &SchemaRef,
    batch: RecordBatch,
) -> Result<RecordBatch, IngestError> {
    let Some(p) = source.partition.as_ref().filter(|p| p.transform.is_some()) else { return Ok(batch) };
    let idx = batch.schema().index_of(&p.column).map_err(|e| IngestError::Config { message: e.to_string() })?;
    let keys = month_keys(batch.column(idx)).map_err(|message| IngestError::Config { message })?;
    let mut b = StringBuilder::with_capacity(keys.len(), keys.len() * 7);
    let mut buf = [0u8; 8];
    for k in keys {
        if k == i64::MIN { b.append_null() } else { b.append_value(month_text(k, &mut buf)) }
    }
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    columns.push(Arc::new(b.finish()));
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| IngestError::Config { message: e.to_string() })
}

/// A batch's rows grouped by Delta partition: `(value, rows)` per partition present, in
/// the order partitions first appear; `None` as the value for an unpartitioned table. The
/// rows keep every source column (the writer drops an identity partition column from the
/// files, as Delta stores it in the log). A batch of one partition is returned as is.
///
/// This replaces delta-rs's per-batch split (row-encode and sort the partition strings,
/// then one take per run): the backfill computes each row's month as an integer and groups
/// rows by it, so no string is built per row.
pub fn split(source: &SourceTable, batch: RecordBatch) -> Result<Vec<(Option<Scalar>, RecordBatch)>, IngestError> {
    let Some(p) = &source.partition else { return Ok(vec![(None, batch)]) };
    let config = |message: String| IngestError::Config { message: format!("table {}: {message}", source.name) };
    let idx = batch.schema().index_of(&p.column).map_err(|e| config(e.to_string()))?;
    let col = batch.column(idx).clone();
    // Each row's partition as an integer key (i64::MIN for NULL).
    let month = p.transform == Some(Transform::Month);
    let keys = if month {
        month_keys(&col).map_err(config)?
    } else {
        // Any type Delta partitions by, grouped through its text form (one-to-one for them).
        let text = cast(&col, &DataType::Utf8).map_err(|e| config(format!("partition column {}: {e}", p.column)))?;
        let mut ids: HashMap<&str, i64> = HashMap::new();
        text.as_string::<i32>()
            .iter()
            .map(|v| {
                v.map_or(i64::MIN, |v| {
                    let next = ids.len() as i64;
                    *ids.entry(v).or_insert(next)
                })
            })
            .collect()
    };
    // The partition's value, from its key (a month) or its first row (a column's value).
    let value = |key: i64, row: u32| -> Result<Scalar, IngestError> {
        if !month {
            return Scalar::from_array(col.as_ref(), row as usize)
                .ok_or_else(|| config(format!("partition column {}: unsupported type {}", p.column, col.data_type())));
        }
        if key == i64::MIN {
            return Ok(Scalar::Null(delta_kernel::schema::DataType::STRING));
        }
        Ok(Scalar::String(month_text(key, &mut [0u8; 8]).into()))
    };
    let groups = group_rows(&keys);
    if let [(key, rows)] = groups.as_slice() {
        return Ok(vec![(Some(value(*key, rows[0])?), batch)]);
    }
    groups
        .into_iter()
        .map(|(key, rows)| {
            let v = value(key, rows[0])?;
            let part = take_record_batch(&batch, &UInt32Array::from(rows)).map_err(|e| config(e.to_string()))?;
            Ok((Some(v), part))
        })
        .collect()
}

/// Each row's month as `year * 12 + month - 1` in UTC (i64::MIN for NULL), for a timestamp
/// or date column: from a table of the batch's day range when it is short (the usual case:
/// one call of the calendar per day, not per row), else per row.
fn month_keys(col: &ArrayRef) -> Result<Vec<i64>, String> {
    let days: Vec<Option<i64>> = match col.data_type() {
        DataType::Timestamp(_, _) => col
            .as_primitive::<TimestampMicrosecondType>()
            .iter()
            .map(|v| v.map(|v| v.div_euclid(86_400_000_000)))
            .collect(),
        DataType::Date32 => col.as_primitive::<Date32Type>().iter().map(|v| v.map(i64::from)).collect(),
        other => return Err(format!("cannot derive a month from {other}")),
    };
    let month = |d: i64| {
        let (y, m) = year_month(d);
        y * 12 + i64::from(m) - 1
    };
    let (lo, hi) = days.iter().flatten().fold((i64::MAX, i64::MIN), |(lo, hi), d| (lo.min(*d), hi.max(*d)));
    Ok(if lo <= hi && hi - lo < 1 << 20 {
        let table: Vec<i64> = (lo..=hi).map(month).collect();
        days.iter().map(|d| d.map_or(i64::MIN, |d| table[(d - lo) as usize])).collect()
    } else {
        days.iter().map(|d| d.map_or(i64::MIN, month)).collect()
    })
}

/// 'YYYY-MM' of a month key of [`month_keys`].
fn month_text(key: i64, buf: &mut [u8; 8]) -> &str {
    format_year_month(key.div_euclid(12), (key.rem_euclid(12) + 1) as u32, buf)
}

/// Row numbers per key, keys in the order they first appear. Keys that span a small range
/// (months, ids handed out in order) are grouped by direct index, others by hash.
fn group_rows(keys: &[i64]) -> Vec<(i64, Vec<u32>)> {
    let mut groups: Vec<(i64, Vec<u32>)> = Vec::new();
    let present = keys.iter().filter(|k| **k != i64::MIN);
    let (lo, hi) = present.fold((i64::MAX, i64::MIN), |(lo, hi), k| (lo.min(*k), hi.max(*k)));
    if lo <= hi && hi - lo < 1 << 16 {
        // The last slot is NULL's.
        let span = (hi - lo + 1) as usize;
        let mut slot_of = vec![usize::MAX; span + 1];
        for (i, &k) in keys.iter().enumerate() {
            let s = if k == i64::MIN { span } else { (k - lo) as usize };
            if slot_of[s] == usize::MAX {
                slot_of[s] = groups.len();
                groups.push((k, Vec::new()));
            }
            groups[slot_of[s]].1.push(i as u32);
        }
    } else {
        let mut slot_of: HashMap<i64, usize> = HashMap::new();
        for (i, &k) in keys.iter().enumerate() {
            let g = *slot_of.entry(k).or_insert_with(|| {
                groups.push((k, Vec::new()));
                groups.len() - 1
            });
            groups[g].1.push(i as u32);
        }
    }
    groups
}

/// (year, month) of a day count since 1970-01-01 (proleptic Gregorian, H. Hinnant's civil_from_days).
pub fn year_month(days: i64) -> (i64, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m)
}

fn format_year_month(y: i64, m: u32, buf: &mut [u8; 8]) -> &str {
    let y = y.clamp(0, 9999) as u32;
    let digits = [y / 1000, y / 100 % 10, y / 10 % 10, y % 10];
    for (i, d) in digits.iter().enumerate() {
        buf[i] = b'0' + *d as u8;
    }
    buf[4] = b'-';
    buf[5] = b'0' + (m / 10) as u8;
    buf[6] = b'0' + (m % 10) as u8;
    std::str::from_utf8(&buf[..7]).expect("ascii")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::Partition;
    use arrow_array::{Int64Array, StringArray, TimestampMicrosecondArray};

    fn table(column: &str, transform: Option<Transform>) -> SourceTable {
        SourceTable {
            name: "t".into(),
            key: vec!["id".into()],
            partition: Some(Partition { column: column.into(), transform }),
            chunk: None,
        }
    }

    fn serialized(parts: &[(Option<Scalar>, RecordBatch)]) -> Vec<(String, Vec<i64>)> {
        parts
            .iter()
            .map(|(v, b)| {
                let v = v.as_ref().map_or("-".to_string(), |v| if v.is_null() { "NULL".into() } else { v.serialize() });
                (v, b.column(0).as_primitive::<arrow_array::types::Int64Type>().values().to_vec())
            })
            .collect()
    }

    #[test]
    fn splits_by_month_and_by_value() {
        const DAY: i64 = 86_400_000_000;
        // 2025-01-31 23:59:59.999999, 2025-02-01, 1969-12-31 (before the epoch), NULL, 2025-01-01.
        let jan31 = (chrono::NaiveDate::from_ymd_opt(2025, 2, 1).unwrap()
            - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap())
        .num_days()
            * DAY;
        let ts =
            TimestampMicrosecondArray::from(vec![Some(jan31 - 1), Some(jan31), Some(-1), None, Some(jan31 - 31 * DAY)])
                .with_timezone("UTC");
        let country = StringArray::from(vec![Some("DE"), Some("AT"), Some("DE"), None, Some("AT")]);
        let ids = Int64Array::from(vec![1, 2, 3, 4, 5]);
        let batch = RecordBatch::try_from_iter([
            ("id", Arc::new(ids) as ArrayRef),
            ("at", Arc::new(ts) as ArrayRef),
            ("country", Arc::new(country) as ArrayRef),
        ])
        .unwrap();
        let months = split(&table("at", Some(Transform::Month)), batch.clone()).unwrap();
        assert_eq!(
            serialized(&months),
            vec![
                ("2025-01".into(), vec![1, 5]),
                ("2025-02".into(), vec![2]),
                ("1969-12".into(), vec![3]),
                ("NULL".into(), vec![4])
            ]
        );
        let countries = split(&table("country", None), batch.clone()).unwrap();
        assert_eq!(
            serialized(&countries),
            vec![("DE".into(), vec![1, 3]), ("AT".into(), vec![2, 5]), ("NULL".into(), vec![4])]
        );
        // Every row lands in exactly one part, and a one-partition batch is passed through.
        assert_eq!(countries.iter().map(|(_, b)| b.num_rows()).sum::<usize>(), 5);
        let one = split(&table("country", None), batch.slice(0, 1)).unwrap();
        assert_eq!(serialized(&one), vec![("DE".into(), vec![1])]);
        let unpartitioned = SourceTable { partition: None, ..table("at", None) };
        assert_eq!(serialized(&split(&unpartitioned, batch.clone()).unwrap()), vec![("-".into(), vec![1, 2, 3, 4, 5])]);
        // The month of a text column is refused with the table's name.
        let e = split(&table("country", Some(Transform::Month)), batch).unwrap_err().to_string();
        assert!(e.contains("table t") && e.contains("month"), "{e}");
    }

    #[test]
    fn groups_sparse_and_dense_keys() {
        assert_eq!(group_rows(&[5, 3, 5, i64::MIN]), vec![(5, vec![0, 2]), (3, vec![1]), (i64::MIN, vec![3])]);
        let sparse = [i64::MAX, 0, i64::MAX];
        assert_eq!(group_rows(&sparse), vec![(i64::MAX, vec![0, 2]), (0, vec![1])]);
        assert_eq!(group_rows(&[i64::MIN, i64::MIN]), vec![(i64::MIN, vec![0, 1])]);
        assert!(group_rows(&[]).is_empty());
    }

    #[test]
    fn months_of_days() {
        assert_eq!(year_month(0), (1970, 1));
        assert_eq!(year_month(-1), (1969, 12));
        // 2025-03-01 and the day before (2025-02-28).
        let d = (chrono::NaiveDate::from_ymd_opt(2025, 3, 1).unwrap()
            - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap())
        .num_days();
        assert_eq!(year_month(d), (2025, 3));
        assert_eq!(year_month(d - 1), (2025, 2));
        for days in (-800_000..800_000).step_by(997) {
            let date = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap() + chrono::Duration::days(days);
            use chrono::Datelike;
            assert_eq!(year_month(days), (i64::from(date.year()), date.month()), "{date}");
        }
        let mut buf = [0u8; 8];
        assert_eq!(format_year_month(2025, 3, &mut buf), "2025-03");
    }
}
