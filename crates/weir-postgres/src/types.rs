//! PostgreSQL column types and their exact Arrow counterparts.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, TimeUnit};

/// A source column type Weir can land exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgType {
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Bool,
    /// numeric(precision, scale) with 1 ≤ precision ≤ 38, 0 ≤ scale ≤ precision.
    Numeric {
        precision: u8,
        scale: i8,
    },
    /// text, varchar(n), char(n) (with Postgres's padding), name.
    Text,
    Date,
    Timestamptz,
    Timestamp,
    Bytea,
    Uuid,
    Json,
    Jsonb,
}

/// A source column: name, type, nullability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgColumn {
    pub name: String,
    pub ty: PgType,
    pub nullable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TypeError {
    #[error("column {table}.{column} has type {ty}, which Weir cannot land exactly ({reason})")]
    Unsupported { table: String, column: String, ty: String, reason: String },
}

impl PgType {
    /// Maps a column from `pg_type.typname`, `atttypmod` and `format_type(…)` (for messages).
    pub fn from_catalog(
        table: &str,
        column: &str,
        typname: &str,
        typmod: i32,
        formatted: &str,
    ) -> Result<Self, TypeError> {
        let unsupported = |reason: &str| TypeError::Unsupported {
            table: table.to_string(),
            column: column.to_string(),
            ty: formatted.to_string(),
            reason: reason.to_string(),
        };
        Ok(match typname {
            "int2" => Self::Int2,
            "int4" => Self::Int4,
            "int8" => Self::Int8,
            "float4" => Self::Float4,
            "float8" => Self::Float8,
            "bool" => Self::Bool,
            "text" | "varchar" | "bpchar" | "name" => Self::Text,
            "date" => Self::Date,
            "timestamptz" => Self::Timestamptz,
            "timestamp" => Self::Timestamp,
            "bytea" => Self::Bytea,
            "uuid" => Self::Uuid,
            "json" => Self::Json,
            "jsonb" => Self::Jsonb,
            "numeric" => {
                if typmod < 4 {
                    return Err(unsupported(
                        "numeric without precision and scale has no exact Arrow decimal; declare numeric(p,s)",
                    ));
                }
                let precision = ((typmod - 4) >> 16) & 0xffff;
                // Postgres 15 stores the scale as an 11-bit signed number.
                let raw_scale = (typmod - 4) & 0x7ff;
                let scale = if raw_scale & 0x400 != 0 { raw_scale - 0x800 } else { raw_scale };
                if !(1..=38).contains(&precision) || scale < 0 || scale > precision {
                    return Err(unsupported("Decimal128 needs 1 ≤ precision ≤ 38 and 0 ≤ scale ≤ precision"));
                }
                Self::Numeric { precision: precision as u8, scale: scale as i8 }
            }
            other => return Err(unsupported(&format!("type {other} is not supported"))),
        })
    }

    pub fn arrow_type(&self) -> DataType {
        match self {
            Self::Int2 => DataType::Int16,
            Self::Int4 => DataType::Int32,
            Self::Int8 => DataType::Int64,
            Self::Float4 => DataType::Float32,
            Self::Float8 => DataType::Float64,
            Self::Bool => DataType::Boolean,
            Self::Numeric { precision, scale } => DataType::Decimal128(*precision, *scale),
            Self::Text | Self::Uuid | Self::Json | Self::Jsonb => DataType::Utf8,
            Self::Date => DataType::Date32,
            Self::Timestamptz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            Self::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            Self::Bytea => DataType::Binary,
        }
    }
}

/// The Arrow schema of a list of source columns.
pub fn arrow_schema(columns: &[PgColumn]) -> Arc<Schema> {
    Arc::new(Schema::new(
        columns.iter().map(|c| Field::new(&c.name, c.ty.arrow_type(), c.nullable)).collect::<Vec<_>>(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typmod(p: i32, s: i32) -> i32 {
        ((p << 16) | (s & 0x7ff)) + 4
    }

    #[test]
    fn numeric_typmods() {
        assert_eq!(
            PgType::from_catalog("t", "c", "numeric", typmod(12, 2), "numeric(12,2)").unwrap(),
            PgType::Numeric { precision: 12, scale: 2 }
        );
        assert_eq!(
            PgType::from_catalog("t", "c", "numeric", typmod(18, 8), "numeric(18,8)").unwrap().arrow_type(),
            DataType::Decimal128(18, 8)
        );
        let e = PgType::from_catalog("listings", "price", "numeric", -1, "numeric").unwrap_err();
        assert!(e.to_string().contains("listings.price") && e.to_string().contains("numeric"), "{e}");
        assert!(PgType::from_catalog("t", "c", "numeric", typmod(40, 2), "numeric(40,2)").is_err());
        assert!(PgType::from_catalog("t", "c", "numeric", typmod(5, -2), "numeric(5,-2)").is_err());
        let e = PgType::from_catalog("t", "tags", "_text", -1, "text[]").unwrap_err();
        assert!(e.to_string().contains("t.tags") && e.to_string().contains("text[]"), "{e}");
    }
}
