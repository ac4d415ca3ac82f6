//! Derived partition columns (`<column>_month` = 'YYYY-MM' in UTC), added to each batch.

use std::sync::Arc;

use arrow_array::builder::StringBuilder;
use arrow_array::cast::AsArray;
use arrow_array::types::{Date32Type, TimestampMicrosecondType};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};

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
    let col = batch.column(idx);
    let n = col.len();
    let mut b = StringBuilder::with_capacity(n, n * 7);
    let push_days = |days: i64, b: &mut StringBuilder| {
        let (y, m) = year_month(days);
        let mut buf = [0u8; 8];
        let text = format_year_month(y, m, &mut buf);
        b.append_value(text);
    };
    match col.data_type() {
        DataType::Timestamp(_, _) => {
            let a = col.as_primitive::<TimestampMicrosecondType>();
            for i in 0..n {
                if a.is_null(i) { b.append_null() } else { push_days(a.value(i).div_euclid(86_400_000_000), &mut b) }
            }
        }
        DataType::Date32 => {
            let a = col.as_primitive::<Date32Type>();
            for i in 0..n {
                if a.is_null(i) { b.append_null() } else { push_days(i64::from(a.value(i)), &mut b) }
            }
        }
        other => return Err(IngestError::Config { message: format!("cannot derive a month from {other}") }),
    }
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    columns.push(Arc::new(b.finish()));
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| IngestError::Config { message: e.to_string() })
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
