//! Connecting to PostgreSQL with errors that name the server (never the password).

use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::{Client, Config, NoTls};

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("invalid PostgreSQL URL {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("cannot connect to PostgreSQL at {target}: {source}")]
    Connect { target: String, source: tokio_postgres::Error },
    #[error("{context}: {}", db_message(.source))]
    Query { context: String, source: tokio_postgres::Error },
    /// From Weir's own protocol client ([`crate::RawConnection`]).
    #[error("{context}: {message}")]
    Raw { context: String, message: String },
}

impl PgError {
    pub fn query(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Self {
        let context = context.into();
        move |source| Self::Query { context, source }
    }

    /// The SQLSTATE of a server error, if this is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Self::Query { source, .. } | Self::Connect { source, .. } => source.as_db_error().map(|e| e.code().code()),
            Self::Url { .. } | Self::Raw { .. } => None,
        }
    }
}

/// The server's own message (with detail) when there is one, else the client's.
pub fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{} ({d})", db.message()),
            None => db.message().to_string(),
        },
        None => e.to_string(),
    }
}

/// `user@host:port/dbname`, for messages; the password is never shown.
pub fn describe_url(url: &str) -> String {
    match Config::from_str(url) {
        Ok(cfg) => describe(&cfg),
        Err(_) => "<unparseable URL>".to_string(),
    }
}

pub(crate) fn describe(cfg: &Config) -> String {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".to_string());
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().unwrap_or("?");
    let db = cfg.get_dbname().unwrap_or(user);
    format!("{user}@{host}:{port}/{db}")
}

pub(crate) fn redact(url: &str) -> String {
    // postgres://user:secret@host → postgres://user:***@host
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..s + 3], user, &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Connects and spawns the connection task on the current runtime.
pub async fn connect(url: &str) -> Result<Client, PgError> {
    let mut cfg = Config::from_str(url).map_err(|e| PgError::Url { url: redact(url), message: e.to_string() })?;
    if cfg.get_hosts().is_empty() {
        return Err(PgError::Url { url: redact(url), message: "no host given".to_string() });
    }
    if cfg.get_user().is_none() {
        return Err(PgError::Url { url: redact(url), message: "no user given".to_string() });
    }
    cfg.application_name("weir");
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(10));
    }
    let target = describe(&cfg);
    let (client, connection) =
        cfg.connect(NoTls).await.map_err(|source| PgError::Connect { target: target.clone(), source })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%target, "postgres connection ended: {e}");
        }
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_and_describes() {
        assert_eq!(redact("postgres://u:pw@h:5/d"), "postgres://u:***@h:5/d");
        assert_eq!(redact("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(describe_url("postgres://u:pw@h:5433/d"), "u@h:5433/d");
    }
}
