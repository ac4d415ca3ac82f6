//! `weir fdw install` / `weir fdw rollback`: the lake's marts inside PostgreSQL under the
//! legacy names, through the weir_fdw extension, and the way back.

use anyhow::{Context, Result, bail};
use weir_core::{Config, validate_slug};
use weir_postgres::PgError;

use crate::cli::{FdwInstallArgs, FdwRollbackArgs};
use crate::settings;

/// Where the foreign tables live (one per gold table); the views point here.
const LAKE_SCHEMA: &str = "weir_lake";
const SERVER: &str = "weir_lake";

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Names of the relations of one kind (pg_class.relkind) in a schema matching a LIKE pattern.
async fn relations(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
    relkind: &str,
    like: &str,
) -> Result<Vec<String>> {
    Ok(tx
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relkind::text = $2 AND c.relname LIKE $3 ORDER BY 1",
            &[&schema, &relkind, &like],
        )
        .await
        .map_err(PgError::query(format!("listing relations in schema {schema}")))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

pub async fn install(a: FdwInstallArgs, cfg: &Config) -> Result<()> {
    let url = settings::pg_url(a.pg.pg.as_deref(), cfg)?;
    let schema = validate_slug(&a.schema).context("--schema")?.to_string();
    if !(a.flight.starts_with("grpc://") || a.flight.starts_with("grpc+tls://")) {
        bail!("--flight {:?}: expected grpc://host:port or grpc+tls://host:port", a.flight);
    }
    let mut client = weir_postgres::connect(&url).await?;
    let available: bool = client
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'weir_fdw')", &[])
        .await
        .map_err(PgError::query("looking for the weir_fdw extension"))?
        .get(0);
    if !available {
        if std::path::Path::new("infra/local/fdw.sh").is_file() && url.contains("127.0.0.1") {
            println!("weir_fdw is not installed in this PostgreSQL: building it (infra/local/fdw.sh)");
            let ok = std::process::Command::new("bash").arg("infra/local/fdw.sh").status()?.success();
            if !ok {
                bail!("infra/local/fdw.sh failed: the weir_fdw extension is not installed");
            }
        } else {
            bail!(
                "the weir_fdw extension is not installed in this PostgreSQL: run infra/local/fdw.sh on the database host"
            );
        }
    }
    let mapping = match (&a.token, &a.user, &a.password) {
        (Some(t), _, _) => format!("token {}", quote_literal(t)),
        (None, Some(u), Some(p)) => format!("user {}, password {}", quote_literal(u), quote_literal(p)),
        (None, Some(u), None) => format!("user {}", quote_literal(u)),
        _ => String::new(),
    };
    let tx = client.transaction().await.map_err(PgError::query("starting a transaction"))?;
    let setup = format!(
        "CREATE EXTENSION IF NOT EXISTS weir_fdw;
         DROP SERVER IF EXISTS {SERVER} CASCADE;
         CREATE SERVER {SERVER} FOREIGN DATA WRAPPER weir_fdw OPTIONS (url {flight});
         CREATE USER MAPPING FOR CURRENT_USER SERVER {SERVER}{options};
         CREATE SCHEMA IF NOT EXISTS {LAKE_SCHEMA};
         IMPORT FOREIGN SCHEMA gold FROM SERVER {SERVER} INTO {LAKE_SCHEMA};",
        flight = quote_literal(&a.flight),
        options = if mapping.is_empty() { String::new() } else { format!(" OPTIONS ({mapping})") },
    );
    tx.batch_execute(&setup).await.map_err(PgError::query("creating the server and the foreign tables"))?;
    let marts = relations(&tx, LAKE_SCHEMA, "f", "ads\\_%").await?;
    if marts.is_empty() {
        bail!("the lake behind {} has no gold ads_<slug> tables: run `weir derive` first", a.flight);
    }
    let cols: Vec<String> = weir_synth::legacy::MART_COLUMNS.iter().map(|(n, t)| format!("{n}::{t} AS {n}")).collect();
    for mart in &marts {
        let kind: Option<String> = tx
            .query_opt(
                "SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&schema, mart],
            )
            .await
            .map_err(PgError::query(format!("looking at {schema}.{mart}")))?
            .map(|r| r.get(0));
        match kind.as_deref() {
            Some("r") if !a.replace_legacy => bail!(
                "{schema}.{mart} is a table (the legacy mart?): pass --replace-legacy to rename it to {mart}_legacy and put the view in its place"
            ),
            Some("r") => {
                tx.batch_execute(&format!("ALTER TABLE \"{schema}\".\"{mart}\" RENAME TO \"{mart}_legacy\""))
                    .await
                    .map_err(PgError::query(format!("renaming {schema}.{mart} (is {mart}_legacy taken?)")))?;
                println!("  {schema}.{mart} → {schema}.{mart}_legacy (weir fdw rollback puts it back)");
            }
            Some("v") | None => {}
            Some(other) => {
                bail!("{schema}.{mart} exists and is not a table or a view (relkind {other}); not touching it")
            }
        }
        tx.batch_execute(&format!(
            "CREATE OR REPLACE VIEW \"{schema}\".\"{mart}\" AS SELECT {} FROM {LAKE_SCHEMA}.\"{mart}\"",
            cols.join(", ")
        ))
        .await
        .map_err(PgError::query(format!("creating the view {schema}.{mart}")))?;
        println!("  {schema}.{mart}: view over {LAKE_SCHEMA}.{mart} (weir_fdw → {})", a.flight);
    }
    tx.commit().await.map_err(PgError::query("committing"))?;
    println!("{} mart view(s) in {schema}, foreign tables in {LAKE_SCHEMA}, server {SERVER}", marts.len());
    Ok(())
}

pub async fn rollback(a: FdwRollbackArgs, cfg: &Config) -> Result<()> {
    let url = settings::pg_url(a.pg.pg.as_deref(), cfg)?;
    let schema = validate_slug(&a.schema).context("--schema")?.to_string();
    let mut client = weir_postgres::connect(&url).await?;
    let tx = client.transaction().await.map_err(PgError::query("starting a transaction"))?;
    let legacy = relations(&tx, &schema, "r", "ads\\_%\\_legacy").await?;
    if legacy.is_empty() {
        bail!("no ads_<slug>_legacy tables in schema {schema}: nothing to roll back");
    }
    for table in &legacy {
        let mart = table.trim_end_matches("_legacy");
        tx.batch_execute(&format!(
            "DROP VIEW IF EXISTS \"{schema}\".\"{mart}\";
             ALTER TABLE \"{schema}\".\"{table}\" RENAME TO \"{mart}\";"
        ))
        .await
        .map_err(PgError::query(format!("restoring {schema}.{mart}")))?;
        println!("  {schema}.{mart}: the legacy table again");
    }
    tx.commit().await.map_err(PgError::query("committing"))?;
    println!("rolled back {} mart(s); the weir_lake server and foreign tables stay for a later install", legacy.len());
    Ok(())
}
