//! Declarative jobs: one `.sql` file per job under `tables/jobs/`, a TOML header in `--!`
//! comment lines, then one SELECT. The loader checks headers, sources and the DAG; SQL that
//! does not plan is reported by the session with the same `file:line:` prefix.
//!
//! ```sql
//! --! layer = "silver"                      # silver (entities) or gold (marts)
//! --! key = ["listing_id"]                  # one row per key
//! --! sources = ["bronze.price_log", "silver.model"]
//! --! materialize = "table"                 # or "view" (planned into its readers, not stored),
//! --!                                       #   or "history" (versions with valid_from/valid_to)
//! --! partition = ["make_id"]               # optional Delta partition columns
//! --! lookup = true                         # optional: stored for lookups by key (gold
//! --!                                       #   tables and per-make tables always are)
//! --! per = "make"                          # optional: one output per make, ads_<slug>;
//! --!                                       #   the SQL uses ${slug} or ${make_id};
//! --!                                       #   it may read another per-make job's output
//! --!                                       #   for the same make as silver.<job>_${slug}
//! SELECT …                                  # ${as_of}: the reference instant, a timestamptz
//! SELECT …
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct JobError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl JobError {
    pub fn new(file: &Path, line: usize, message: impl Into<String>) -> Self {
        JobError { file: file.display().to_string(), line, message: message.into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    Silver,
    Gold,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layer::Silver => "silver",
            Layer::Gold => "gold",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Materialize {
    #[default]
    Table,
    View,
    /// A table of versions: every run compares the job's result with the open versions and
    /// closes what changed or went (`valid_to` = the run's as-of) and opens new versions
    /// (`valid_from` = the as-of). See [`crate::history`].
    History,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    Make,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    layer: Layer,
    key: Vec<String>,
    sources: Vec<String>,
    #[serde(default)]
    materialize: Materialize,
    #[serde(default)]
    partition: Vec<String>,
    per: Option<Per>,
    #[serde(default)]
    lookup: bool,
    #[serde(default)]
    description: Option<String>,
    incremental: Option<Incremental>,
}

/// How a table job is brought up to date from its inputs' change feeds instead of rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Incremental {
    /// The source whose inserted rows are folded in: the job's SQL runs over the new rows
    /// only (as `delta`) and `merge` combines that with the table's rows (`current`). Without
    /// a fold, every affected key is recomputed by the job's SQL (`keyed` sources restricted
    /// to the affected keys) and nothing is merged.
    #[serde(default)]
    pub fold: Option<String>,
    /// SQL over `delta` and `current`: one row per key of `delta`, the table's new row.
    #[serde(default)]
    pub merge: Option<String>,
    /// Sources whose row for a key is all the job reads of them for that key (the
    /// listing of a listing's mart row): restricted to the affected keys when they are
    /// recomputed, instead of read whole.
    #[serde(default)]
    pub keyed: Vec<String>,
    /// Other sources (and the fold source's deletes and updates): SQL over `changes` (the
    /// source's change feed rows, with `_change_type`) and `new_rows` (the fold source's
    /// inserted rows) returning the keys to recompute from their whole history. A source
    /// read through a view is named by the stored table under the view (`bronze.listings`
    /// for `silver.listing`).
    #[serde(default)]
    pub affects: BTreeMap<String, String>,
    /// Keys whose row is removed outright (the job produces none for them any more, e.g. an
    /// inner-joined entity that was deleted): SQL over `changes`, like `affects`.
    #[serde(default)]
    pub removes: BTreeMap<String, String>,
}

/// One job, as declared.
#[derive(Debug, Clone)]
pub struct Job {
    /// The file stem: `listing_price`, `ads` (a per-make job's outputs are `ads_<slug>`).
    pub name: String,
    pub file: PathBuf,
    pub layer: Layer,
    pub key: Vec<String>,
    /// `bronze.<table>`, `silver.<job>`.
    pub sources: Vec<String>,
    pub materialize: Materialize,
    pub partition: Vec<String>,
    pub per: Option<Per>,
    /// Declared `lookup = true`: read by key (see [`Job::key_ranged`]).
    pub lookup: bool,
    pub description: Option<String>,
    /// The SELECT, placeholders unexpanded.
    pub sql: String,
    /// 1-based line of the file where the SQL starts.
    pub sql_line: usize,
    /// A fingerprint of the file: a changed definition is rebuilt.
    pub fingerprint: String,
    pub incremental: Option<Incremental>,
}

impl Job {
    /// The relation this job produces, e.g. `silver.listing` or (per make) `gold.ads_vw`.
    pub fn output(&self, slug: Option<&str>) -> String {
        match slug {
            Some(s) => format!("{}.{}_{s}", self.layer, self.name),
            None => format!("{}.{}", self.layer, self.name),
        }
    }

    /// Stored in key order, in small files with disjoint key ranges within a partition (what
    /// Flight clients and the FDW look up by key): gold tables, per-make tables, and tables
    /// declared `lookup = true` (`silver.ads_base`, the rows the marts' views read).
    pub fn key_ranged(&self) -> bool {
        (self.layer == Layer::Gold || self.per.is_some() || self.lookup) && !self.key.is_empty()
    }

    pub fn uses_as_of(&self) -> bool {
        self.sql.contains("${as_of}") || self.uses_as_of_date()
    }

    /// The SQL reads the as-of only as its UTC calendar date (`${as_of_date}`): a later
    /// instant on the same day builds the same table.
    pub fn uses_as_of_date(&self) -> bool {
        self.sql.contains("${as_of_date}")
    }

    pub fn reads_as_of_date_only(&self) -> bool {
        self.uses_as_of_date() && !self.sql.contains("${as_of}")
    }

    /// The SQL with `${slug}`, `${make_id}`, `${as_of}` and `${as_of_date}` expanded.
    pub fn expand(&self, make: Option<(&str, i64)>, as_of_micros: i64) -> String {
        let instant = format!("to_timestamp_micros({as_of_micros}) AT TIME ZONE 'UTC'");
        let mut sql =
            self.sql.replace("${as_of_date}", &format!("CAST({instant} AS DATE)")).replace("${as_of}", &instant);
        if let Some((slug, id)) = make {
            sql = sql.replace("${slug}", slug).replace("${make_id}", &id.to_string());
        }
        sql
    }

    /// A view's SQL as served: `${slug}` and `${make_id}` expanded for a per-make view.
    pub fn expand_view(&self, make: Option<(&str, i64)>) -> String {
        self.expand(make, 0)
    }

    /// The per-make sources a per-make job reads for its own make, as `(source, output)`:
    /// (`silver.ads_base`, `silver.ads_base_vw`).
    pub fn own_make_sources<'a>(&'a self, jobs: &'a Jobs, slug: &'a str) -> impl Iterator<Item = (&'a str, String)> {
        self.sources.iter().filter_map(move |s| {
            let (_, n) = s.split_once('.')?;
            jobs.get(n).filter(|d| d.per.is_some()).map(|_| (s.as_str(), format!("{s}_{slug}")))
        })
    }

    /// Maps a line of the SQL body (1-based, as parsers report) to the file's line.
    pub fn file_line(&self, sql_line: usize) -> usize {
        self.sql_line + sql_line.saturating_sub(1)
    }
}

/// The jobs of a folder in dependency order.
#[derive(Debug, Clone)]
pub struct Jobs {
    pub ordered: Vec<Job>,
}

impl Jobs {
    pub fn get(&self, name: &str) -> Option<&Job> {
        self.ordered.iter().find(|j| j.name == name)
    }

    /// The job producing `output` (`silver.listing`, `gold.ads_vw`) and, for a per-make job,
    /// the slug. A name that two per-make jobs could produce (`ads_base_vw`) goes to the job
    /// with the longer name.
    pub fn resolve(&self, output: &str) -> Option<(&Job, Option<String>)> {
        let (layer, name) = output.split_once('.')?;
        let by_name = |j: &&Job| j.layer.to_string() == layer;
        if let Some(j) = self.ordered.iter().filter(by_name).find(|j| j.per.is_none() && j.name == name) {
            return Some((j, None));
        }
        self.ordered
            .iter()
            .filter(by_name)
            .filter(|j| j.per.is_some())
            .filter_map(|j| {
                let slug = name.strip_prefix(j.name.as_str())?.strip_prefix('_')?;
                (!slug.is_empty()).then(|| (j, Some(slug.to_string())))
            })
            .max_by_key(|(j, _)| j.name.len())
    }

    /// `name` and everything it reads from, transitively, in dependency order.
    pub fn upstream_of(&self, name: &str) -> Vec<&Job> {
        let mut want: BTreeSet<String> = BTreeSet::from([name.to_string()]);
        for job in self.ordered.iter().rev() {
            if want.contains(&job.name) {
                for s in &job.sources {
                    if let Some(("silver" | "gold", n)) = s.split_once('.') {
                        want.insert(n.to_string());
                    }
                }
            }
        }
        self.ordered.iter().filter(|j| want.contains(&j.name)).collect()
    }
}

fn fingerprint(text: &str) -> String {
    // FNV-1a 64: stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Parses one job file's text.
pub fn parse_job(file: &Path, text: &str) -> Result<Job, JobError> {
    let name = file
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| JobError::new(file, 1, "the file name is not a job name"))?
        .to_string();
    if weir_core::validate_slug(&name).is_err() {
        return Err(JobError::new(file, 1, format!("job name {name:?} must be lower-case ascii, digits and _")));
    }
    let mut header = String::new();
    let mut sql_line = 0;
    for (i, line) in text.lines().enumerate() {
        if let Some(rest) = line.strip_prefix("--!") {
            header.push_str(rest);
            header.push('\n');
        } else {
            // Header lines must come first; keep counting lines so TOML errors map.
            header.push('\n');
            if sql_line == 0 && !line.trim().is_empty() && !line.trim_start().starts_with("--") {
                sql_line = i + 1;
            }
        }
    }
    if sql_line == 0 {
        return Err(JobError::new(file, text.lines().count().max(1), "no SQL after the header"));
    }
    let h: Header = toml::from_str(&header).map_err(|e| {
        let line = e.span().map(|s| header[..s.start].matches('\n').count() + 1).unwrap_or(1);
        JobError::new(file, line, format!("header: {}", e.message()))
    })?;
    let header_line = |key: &str| {
        text.lines().position(|l| l.starts_with("--!") && l[3..].trim_start().starts_with(key)).map_or(1, |i| i + 1)
    };
    if h.key.is_empty() {
        return Err(JobError::new(file, header_line("key"), "key must name at least one column"));
    }
    if h.sources.is_empty() {
        return Err(JobError::new(file, header_line("sources"), "sources must name at least one table"));
    }
    let sql_text: String = text.lines().skip(sql_line - 1).collect::<Vec<_>>().join("\n");
    if h.per.is_some() && !sql_text.contains("${slug}") && !sql_text.contains("${make_id}") {
        return Err(JobError::new(
            file,
            header_line("per"),
            "per = \"make\" but the SQL uses neither ${slug} nor ${make_id}",
        ));
    }
    if h.per.is_none() && (sql_text.contains("${slug}") || sql_text.contains("${make_id}")) {
        return Err(JobError::new(
            file,
            sql_line,
            "the SQL uses ${slug} or ${make_id} but the header has no per = \"make\"",
        ));
    }
    if h.materialize == Materialize::View && !h.partition.is_empty() {
        return Err(JobError::new(file, header_line("materialize"), "a view has no partitions"));
    }
    if h.lookup && h.materialize != Materialize::Table {
        return Err(JobError::new(file, header_line("lookup"), "lookup = true is for table jobs"));
    }
    if h.materialize == Materialize::History && (!h.partition.is_empty() || h.per.is_some()) {
        return Err(JobError::new(
            file,
            header_line("materialize"),
            "a history job has no partitions and no per-make outputs",
        ));
    }
    if let Some(inc) = &h.incremental {
        let line = header_line("[incremental]");
        if h.materialize != Materialize::Table || h.key.len() != 1 {
            return Err(JobError::new(file, line, "incremental needs a table job with a one-column key"));
        }
        match (&inc.fold, &inc.merge) {
            (Some(_), Some(_)) if h.per.is_some() => {
                return Err(JobError::new(file, line, "a per-make job cannot fold (it recomputes affected keys)"));
            }
            (Some(_), Some(_)) => {}
            (None, None) if !inc.affects.is_empty() => {}
            (None, None) => {
                return Err(JobError::new(file, line, "incremental needs a fold and a merge, or affects rules"));
            }
            _ => return Err(JobError::new(file, line, "incremental fold and merge go together")),
        }
        for s in inc.fold.iter().chain(&inc.keyed) {
            if !h.sources.contains(s) {
                return Err(JobError::new(file, line, format!("incremental names {s}, which is not in sources")));
            }
        }
    }
    Ok(Job {
        name,
        file: file.to_path_buf(),
        layer: h.layer,
        key: h.key,
        sources: h.sources,
        materialize: h.materialize,
        partition: h.partition,
        per: h.per,
        lookup: h.lookup,
        description: h.description,
        sql: sql_text.trim_end().trim_end_matches(';').to_string(),
        sql_line,
        fingerprint: fingerprint(text),
        incremental: h.incremental,
    })
}

/// Loads every `*.sql` under `dir`, checks sources against `bronze` (the source tables) and
/// the other jobs, and orders the DAG. Cycles and unknown sources are errors naming the file.
pub fn load_dir(dir: &Path, bronze: &[String]) -> Result<Jobs, JobError> {
    order(parse_dir(dir)?, bronze)
}

/// Parses every `*.sql` under `dir`, without checking sources (see [`order`]).
pub fn parse_dir(dir: &Path) -> Result<Vec<Job>, JobError> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| JobError::new(dir, 0, format!("cannot read the jobs folder: {e}")))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(JobError::new(dir, 0, "no job files (*.sql)"));
    }
    let mut jobs = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).map_err(|e| JobError::new(f, 0, format!("cannot read: {e}")))?;
        jobs.push(parse_job(f, &text)?);
    }
    Ok(jobs)
}

/// Loads jobs from (name, text) pairs, e.g. a copy built into the binary.
pub fn from_texts(files: &[(&str, &str)], bronze: &[String]) -> Result<Jobs, JobError> {
    let jobs = files.iter().map(|(f, t)| parse_job(Path::new(f), t)).collect::<Result<Vec<_>, _>>()?;
    order(jobs, bronze)
}

/// Checks sources and sorts the jobs so every job comes after what it reads.
pub fn order(jobs: Vec<Job>, bronze: &[String]) -> Result<Jobs, JobError> {
    let mut by_name: BTreeMap<String, Job> = BTreeMap::new();
    for j in jobs {
        if let Some(other) = by_name.get(&j.name) {
            return Err(JobError::new(
                &j.file,
                1,
                format!("job {} is also defined in {}", j.name, other.file.display()),
            ));
        }
        by_name.insert(j.name.clone(), j);
    }
    for j in by_name.values() {
        for s in &j.sources {
            let line = j.sql_line.min(
                std::fs::read_to_string(&j.file)
                    .ok()
                    .and_then(|t| t.lines().position(|l| l.contains(s.as_str())).map(|i| i + 1))
                    .unwrap_or(1),
            );
            let ok = match s.split_once('.') {
                Some(("bronze", t)) => bronze.iter().any(|b| b == t),
                Some(("silver" | "gold", n)) => match by_name.get(n) {
                    Some(dep) if dep.per.is_some() && j.per.is_none() => {
                        return Err(JobError::new(
                            &j.file,
                            line,
                            format!("source {s} is a per-make job; only a per-make job can read it (as {s}_${{slug}})"),
                        ));
                    }
                    Some(dep) => s.starts_with(&format!("{}.", dep.layer)),
                    None => false,
                },
                _ => false,
            };
            if !ok {
                return Err(JobError::new(
                    &j.file,
                    line,
                    format!(
                        "unknown source {s} (bronze tables: {}; jobs: {})",
                        bronze.join(", "),
                        by_name.values().map(|d| d.output(None)).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
    }
    // Incremental rules name a source, or a stored table read through a view source.
    for j in by_name.values() {
        let Some(inc) = &j.incremental else { continue };
        let reachable = read_through_views(&j.sources, &by_name);
        for s in inc.affects.keys().chain(inc.removes.keys()) {
            if !reachable.contains(s) {
                return Err(JobError::new(
                    &j.file,
                    1,
                    format!("incremental names {s}, which is neither a source nor read through a view source"),
                ));
            }
        }
    }
    // Kahn's algorithm, alphabetical among the ready ones.
    let deps = |j: &Job| -> BTreeSet<String> {
        j.sources
            .iter()
            .filter_map(|s| s.split_once('.'))
            .filter(|(l, _)| *l != "bronze")
            .map(|(_, n)| n.to_string())
            .collect()
    };
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut ordered = Vec::new();
    while done.len() < by_name.len() {
        let ready: Vec<String> = by_name
            .values()
            .filter(|j| !done.contains(&j.name) && deps(j).iter().all(|d| done.contains(d)))
            .map(|j| j.name.clone())
            .collect();
        if ready.is_empty() {
            let stuck: Vec<&Job> = by_name.values().filter(|j| !done.contains(&j.name)).collect();
            let first = stuck[0];
            let names: Vec<&str> = stuck.iter().map(|j| j.name.as_str()).collect();
            return Err(JobError::new(&first.file, 1, format!("dependency cycle among jobs {}", names.join(", "))));
        }
        for n in ready {
            done.insert(n.clone());
            ordered.push(by_name[&n].clone());
        }
    }
    Ok(Jobs { ordered })
}

/// `sources`, and what their view jobs read, transitively.
fn read_through_views(sources: &[String], by_name: &BTreeMap<String, Job>) -> BTreeSet<String> {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut todo: Vec<String> = sources.to_vec();
    while let Some(s) = todo.pop() {
        if !seen.insert(s.clone()) {
            continue;
        }
        if let Some(view) =
            s.split_once('.').and_then(|(_, n)| by_name.get(n)).filter(|j| j.materialize == Materialize::View)
        {
            todo.extend(view.sources.iter().cloned());
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job file: `layer`, key `id`, `sources`, then `extra` header lines and the SQL.
    fn job_with(name: &str, layer: &str, sources: &[&str], extra: &str, sql: &str) -> Job {
        let text = format!(
            "--! layer = \"{layer}\"\n--! key = [\"id\"]\n--! sources = [{}]\n{extra}{sql}\n",
            sources.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ")
        );
        parse_job(Path::new(&format!("/nonexistent/{name}.sql")), &text).unwrap()
    }

    fn job(name: &str, sources: &[&str]) -> Job {
        job_with(name, "silver", sources, "", "SELECT 1 AS id")
    }

    #[test]
    fn orders_by_dependency_and_rejects_cycles_and_unknown_sources() {
        let bronze = vec!["t".to_string()];
        let jobs = order(vec![job("b", &["silver.a"]), job("a", &["bronze.t"])], &bronze).unwrap();
        let names: Vec<&str> = jobs.ordered.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        let e = order(vec![job("a", &["silver.b"]), job("b", &["silver.a"])], &bronze).unwrap_err();
        assert!(e.to_string().contains("dependency cycle among jobs a, b"), "{e}");
        let e = order(vec![job("a", &["bronze.nope"])], &bronze).unwrap_err();
        assert!(e.to_string().contains("unknown source bronze.nope"), "{e}");
    }

    fn per_make(name: &str, layer: &str, sources: &[&str], extra: &str, sql: &str) -> Job {
        job_with(name, layer, sources, &format!("--! per = \"make\"\n{extra}"), sql)
    }

    #[test]
    fn per_make_views_read_their_own_makes_rows() {
        let bronze = vec!["t".to_string()];
        let base = per_make("ads_base", "silver", &["bronze.t"], "", "SELECT id FROM bronze.t WHERE s = '${slug}'");
        let view = per_make(
            "ads",
            "gold",
            &["silver.ads_base"],
            "--! materialize = \"view\"\n",
            "SELECT id FROM silver.ads_base_${slug}",
        );
        let jobs = order(vec![view.clone(), base.clone()], &bronze).unwrap();
        let names: Vec<&str> = jobs.ordered.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["ads_base", "ads"]);
        let ads = jobs.get("ads").unwrap();
        assert_eq!(ads.expand_view(Some(("vw", 7))), "SELECT id FROM silver.ads_base_vw");
        let own: Vec<(&str, String)> = ads.own_make_sources(&jobs, "vw").collect();
        assert_eq!(own, [("silver.ads_base", "silver.ads_base_vw".to_string())]);
        // Outputs map back to their job and make; a longer job name wins a shared prefix.
        let of = |o: &str| jobs.resolve(o).map(|(j, s)| (j.name.clone(), s));
        assert_eq!(of("gold.ads_vw"), Some(("ads".into(), Some("vw".into()))));
        assert_eq!(of("silver.ads_base_mercedes_benz"), Some(("ads_base".into(), Some("mercedes_benz".into()))));
        assert_eq!(of("gold.ads_"), None);
        assert_eq!(of("silver.listing"), None);
        // A job that is not per make cannot read a per-make output.
        let e = order(vec![base, job("x", &["silver.ads_base"])], &bronze).unwrap_err();
        assert!(e.to_string().contains("only a per-make job can read it"), "{e}");
        // A per-make view over one table partitioned by make: its make_id is expanded when
        // served; `lookup = true` stores a silver table in key order, and only a table.
        let text = "--! layer = \"gold\"\n--! key = [\"id\"]\n--! sources = [\"bronze.t\"]\n--! per = \"make\"\n--! materialize = \"view\"\nSELECT id FROM bronze.t WHERE m = ${make_id} AND s = '${slug}'\n";
        let view = parse_job(Path::new("v.sql"), text).unwrap();
        assert_eq!(view.expand_view(Some(("vw", 7))), "SELECT id FROM bronze.t WHERE m = 7 AND s = 'vw'");
        let base = "--! layer = \"silver\"\n--! key = [\"id\"]\n--! sources = [\"bronze.t\"]\n--! lookup = true\nSELECT id FROM bronze.t\n";
        assert!(parse_job(Path::new("b.sql"), base).unwrap().key_ranged());
        assert!(!parse_job(Path::new("b.sql"), &base.replace("--! lookup = true\n", "")).unwrap().key_ranged());
        let e =
            parse_job(Path::new("b.sql"), &base.replace("lookup = true", "lookup = true\n--! materialize = \"view\""))
                .unwrap_err();
        assert!(e.to_string().contains("b.sql:4: lookup = true is for table jobs"), "{e}");
    }

    #[test]
    fn incremental_headers_are_checked() {
        let head = "--! layer = \"silver\"\n--! key = [\"id\"]\n--! sources = [\"bronze.t\", \"bronze.u\"]\n";
        let ok = format!(
            "{head}--! [incremental]\n--! fold = \"bronze.t\"\n--! merge = \"\"\"\n--! SELECT * FROM delta\n--! \"\"\"\n--! [incremental.removes]\n--! \"bronze.u\" = \"SELECT id FROM changes\"\nSELECT 1 AS id\n"
        );
        let job = parse_job(Path::new("x.sql"), &ok).unwrap();
        let inc = job.incremental.expect("declared");
        assert_eq!(inc.fold.as_deref(), Some("bronze.t"));
        assert_eq!(inc.merge.as_deref().map(str::trim), Some("SELECT * FROM delta"));
        assert_eq!(inc.removes.get("bronze.u").map(String::as_str), Some("SELECT id FROM changes"));
        let unknown = ok.replace("fold = \"bronze.t\"", "fold = \"bronze.v\"");
        let e = parse_job(Path::new("x.sql"), &unknown).unwrap_err();
        assert!(e.to_string().contains("incremental names bronze.v, which is not in sources"), "{e}");
        assert_eq!(e.line, 4, "the [incremental] line: {e}");
        let view = ok.replace("[incremental]\n", "materialize = \"view\"\n--! [incremental]\n");
        let e = parse_job(Path::new("x.sql"), &view).unwrap_err();
        assert!(e.to_string().contains("incremental needs a table job"), "{e}");
        let lonely = ok.replace("--! fold = \"bronze.t\"\n", "");
        let e = parse_job(Path::new("x.sql"), &lonely).unwrap_err();
        assert!(e.to_string().contains("fold and merge go together"), "{e}");
        let no_rules = format!("{head}--! [incremental]\n--! keyed = [\"bronze.t\"]\nSELECT 1 AS id\n");
        let e = parse_job(Path::new("x.sql"), &no_rules).unwrap_err();
        assert!(e.to_string().contains("a fold and a merge, or affects rules"), "{e}");
    }

    #[test]
    fn rules_may_name_tables_read_through_views() {
        let bronze = vec!["t".to_string(), "u".to_string()];
        let view = parse_job(
            Path::new("v.sql"),
            "--! layer = \"silver\"\n--! key = [\"id\"]\n--! sources = [\"bronze.t\"]\n--! materialize = \"view\"\nSELECT 1 AS id\n",
        )
        .unwrap();
        let mart = |rule: &str| {
            let text = format!(
                "--! layer = \"gold\"\n--! key = [\"id\"]\n--! sources = [\"silver.v\"]\n--! per = \"make\"\n--! [incremental]\n--! [incremental.affects]\n--! \"{rule}\" = \"SELECT id FROM changes\"\nSELECT id FROM silver.v WHERE '${{slug}}' <> ''\n"
            );
            parse_job(Path::new("m.sql"), &text).unwrap()
        };
        order(vec![view.clone(), mart("bronze.t")], &bronze).expect("bronze.t is read through silver.v");
        let e = order(vec![view, mart("bronze.u")], &bronze).unwrap_err();
        assert!(e.to_string().contains("incremental names bronze.u, which is neither a source"), "{e}");
    }

    #[test]
    fn header_errors_name_the_line() {
        let text = "--! layer = \"silver\"\n--! key = [\"id\"]\n--! sources = [\"bronze.t\"]\n--! materialise = \"view\"\nSELECT 1\n";
        let e = parse_job(Path::new("x.sql"), text).unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.to_string().starts_with("x.sql:4: header: unknown field `materialise`"), "{e}");
        let e = parse_job(Path::new("x.sql"), "--! layer = \"silver\"\n").unwrap_err();
        assert!(e.to_string().contains("no SQL after the header"), "{e}");
    }
}
