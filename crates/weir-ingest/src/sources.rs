//! `tables/sources.toml`: which source tables land, with their keys, partitioning and chunking.

use serde::Deserialize;

use crate::IngestError;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sources {
    #[serde(rename = "table")]
    pub tables: Vec<SourceTable>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceTable {
    pub name: String,
    pub key: Vec<String>,
    #[serde(default)]
    pub partition: Option<Partition>,
    #[serde(default)]
    pub chunk: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    pub column: String,
    #[serde(default)]
    pub transform: Option<Transform>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Transform {
    /// 'YYYY-MM' of a timestamp (UTC) or date.
    Month,
}

impl SourceTable {
    /// The Delta partition column: the source column itself, or the derived `<column>_month`.
    pub fn partition_column(&self) -> Option<String> {
        self.partition.as_ref().map(|p| match p.transform {
            None => p.column.clone(),
            Some(Transform::Month) => format!("{}_month", p.column),
        })
    }

    /// Location of the landed table under the lake.
    pub fn bronze_path(&self) -> String {
        format!("bronze/{}", self.name)
    }
}

impl Sources {
    /// The tables' names, in file order: what `bronze.<name>` may name in a job.
    pub fn names(&self) -> Vec<String> {
        self.tables.iter().map(|t| t.name.clone()).collect()
    }

    /// Parses the file's text; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self, IngestError> {
        let sources: Self = toml::from_str(text).map_err(|e| IngestError::Sources {
            path: path.to_string(),
            message: e.message().to_string() + &e.span().map(|s| format!(" (at byte {})", s.start)).unwrap_or_default(),
        })?;
        let mut seen = std::collections::HashSet::new();
        for t in &sources.tables {
            let bad = |m: String| IngestError::Sources { path: path.to_string(), message: m };
            if !seen.insert(t.name.as_str()) {
                return Err(bad(format!("table {} is listed twice", t.name)));
            }
            if !is_ident(&t.name) {
                return Err(bad(format!("table name {:?} is not a plain identifier", t.name)));
            }
            if t.key.is_empty() {
                return Err(bad(format!("table {} needs at least one key column", t.name)));
            }
            for c in t.key.iter().chain(t.chunk.iter()).chain(t.partition.iter().map(|p| &p.column)) {
                if !is_ident(c) {
                    return Err(bad(format!("table {}: column name {c:?} is not a plain identifier", t.name)));
                }
            }
        }
        Ok(sources)
    }

    /// The tables named (all when `only` is None); an unknown name is an error listing the known.
    pub fn select(&self, only: Option<&[String]>) -> Result<Vec<SourceTable>, IngestError> {
        let Some(only) = only else { return Ok(self.tables.clone()) };
        only.iter()
            .map(|n| {
                self.tables.iter().find(|t| &t.name == n).cloned().ok_or_else(|| IngestError::UnknownTable {
                    table: n.clone(),
                    known: self.tables.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", "),
                })
            })
            .collect()
    }
}

fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some('a'..='z' | '_')) && c.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_')) && s.len() <= 63
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_repo_file() {
        let text = include_str!("../../../tables/sources.toml");
        let s = Sources::parse(text, "tables/sources.toml").unwrap();
        let names: Vec<_> = s.tables.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["makes", "models", "dealers", "listings", "price_log", "fx_rates"]);
        let pl = &s.tables[4];
        assert_eq!(pl.partition_column().as_deref(), Some("changed_at_month"));
        assert_eq!(s.tables[3].partition_column().as_deref(), Some("country"));
        assert_eq!(pl.chunk.as_deref(), Some("listing_id"));
    }

    #[test]
    fn rejects_bad_files() {
        for (text, needle) in [
            ("[[table]]\nname = 'a'\n", "key"),
            ("[[table]]\nname = 'a'\nkey = ['x']\n[[table]]\nname = 'a'\nkey = ['y']\n", "twice"),
            ("[[table]]\nname = 'a; drop'\nkey = ['x']\n", "identifier"),
            ("[[table]]\nname = 'a'\nkey = ['x']\npartition = { column = 'c', transform = 'week' }\n", "week"),
            ("[[table]]\nname = 'a'\nkey = ['x']\nchunks = 'x'\n", "chunks"),
        ] {
            let e = Sources::parse(text, "s.toml").unwrap_err().to_string();
            assert!(e.contains("s.toml") && e.contains(needle), "{e}");
        }
        let s = Sources::parse("[[table]]\nname = 'a'\nkey = ['x']\n", "s.toml").unwrap();
        let e = s.select(Some(&["b".to_string()])).unwrap_err().to_string();
        assert!(e.contains("\"b\"") && e.contains("a"), "{e}");
    }
}
