//! `weir.toml` and environment overrides. The binary reads both once and passes them in.

use std::collections::HashMap;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("malformed config {path}: {message}")]
    Malformed { path: String, message: String },
    #[error("invalid value {value:?} for {name}: {reason}")]
    Invalid { name: String, value: String, reason: String },
}

/// Everything configurable. Every field can come from `weir.toml` or the environment; the
/// environment wins. Command-line flags win over both (the binary applies them).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Source PostgreSQL URL (`WEIR_PG_URL`).
    pub pg_url: Option<String>,
    /// Lake URI (`WEIR_LAKE`): `file://./.weir/lake` by default.
    pub lake: Option<String>,
    /// Allow an S3 bucket outside the EU (`WEIR_ALLOW_NON_EU`).
    #[serde(default)]
    pub allow_non_eu: bool,
    #[serde(default)]
    pub s3: S3Settings,
    #[serde(default)]
    pub serve: ServeSettings,
    /// A merge into a Delta table folds its files of fewer live rows than this into the
    /// files it writes (`WEIR_SMALL_FILE_ROWS`; 8192 by default, 0 marks deleted rows only).
    pub small_file_rows: Option<u64>,
}

/// `weir serve`: who may connect, and how much a query may use.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServeSettings {
    /// Users for the Flight handshake (basic auth → a bearer token).
    #[serde(default)]
    pub users: Vec<ServeUser>,
    /// Bearer tokens accepted without a handshake (`WEIR_SERVE_TOKEN` adds one).
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Accept clients without credentials. Off unless set.
    #[serde(default)]
    pub anonymous: bool,
    /// Per-query memory limit in MiB (default 1024); a query over it fails, it never spills.
    pub memory_limit_mb: Option<usize>,
    /// TLS certificate and key (PEM) paths; both or neither.
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
}

#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServeUser {
    pub name: String,
    pub password: String,
}

impl std::fmt::Debug for ServeUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeUser").field("name", &self.name).field("password", &"<redacted>").finish()
    }
}

/// S3 connection settings; the standard AWS variables override them.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    /// `AWS_ENDPOINT_URL`: for S3-compatible servers (path-style requests are used then).
    pub endpoint: Option<String>,
    /// `AWS_REGION` / `AWS_DEFAULT_REGION`.
    pub region: Option<String>,
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    /// `AWS_SESSION_TOKEN`.
    pub session_token: Option<String>,
    /// Allow plain http endpoints (`AWS_ALLOW_HTTP`); on by default for http:// endpoints.
    pub allow_http: Option<bool>,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "<redacted>"))
            .field("session_token", &self.session_token.as_ref().map(|_| "<redacted>"))
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

pub const DEFAULT_LAKE: &str = "file://./.weir/lake";

impl Config {
    /// Parses `weir.toml` text; `path` only names the file in errors.
    pub fn from_toml(text: &str, path: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Malformed {
            path: path.to_string(),
            message: e.message().to_string() + &e.span().map(|s| format!(" (at byte {})", s.start)).unwrap_or_default(),
        })
    }

    /// Applies environment overrides from the given map (the binary passes `std::env::vars()`).
    pub fn with_env(mut self, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        if let Some(v) = get("WEIR_PG_URL") {
            self.pg_url = Some(v);
        }
        if let Some(v) = get("WEIR_LAKE") {
            self.lake = Some(v);
        }
        if let Some(v) = get("WEIR_ALLOW_NON_EU") {
            self.allow_non_eu = parse_bool("WEIR_ALLOW_NON_EU", &v)?;
        }
        if let Some(v) = get("WEIR_SMALL_FILE_ROWS") {
            self.small_file_rows = Some(v.trim().parse().map_err(|_| ConfigError::Invalid {
                name: "WEIR_SMALL_FILE_ROWS".to_string(),
                value: v.clone(),
                reason: "expected a number of rows (0 or more)".to_string(),
            })?);
        }
        let s3 = &mut self.s3;
        if let Some(v) = get("AWS_ENDPOINT_URL").or_else(|| get("AWS_ENDPOINT_URL_S3")) {
            s3.endpoint = Some(v);
        }
        if let Some(v) = get("AWS_REGION").or_else(|| get("AWS_DEFAULT_REGION")) {
            s3.region = Some(v);
        }
        if let Some(v) = get("AWS_ACCESS_KEY_ID") {
            s3.access_key_id = Some(v);
        }
        if let Some(v) = get("AWS_SECRET_ACCESS_KEY") {
            s3.secret_access_key = Some(v);
        }
        if let Some(v) = get("AWS_SESSION_TOKEN") {
            s3.session_token = Some(v);
        }
        if let Some(v) = get("AWS_ALLOW_HTTP") {
            s3.allow_http = Some(parse_bool("AWS_ALLOW_HTTP", &v)?);
        }
        if let Some(v) = get("WEIR_SERVE_TOKEN") {
            self.serve.tokens.push(v);
        }
        Ok(self)
    }

    pub fn lake_or_default(&self) -> &str {
        self.lake.as_deref().unwrap_or(DEFAULT_LAKE)
    }
}

fn parse_bool(name: &str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::Invalid {
            name: name.to_string(),
            value: v.to_string(),
            reason: "expected true or false".to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_and_env() {
        let cfg = Config::from_toml(
            "pg_url = 'postgres://a@h/db'\n[s3]\nregion = 'eu-west-1'\nsecret_access_key = 's'\n",
            "weir.toml",
        )
        .unwrap();
        assert_eq!(cfg.pg_url.as_deref(), Some("postgres://a@h/db"));
        assert!(!format!("{cfg:?}").contains("\"s\""), "secrets are redacted in Debug");
        let env: HashMap<String, String> =
            [("WEIR_LAKE", "s3://b-1/x"), ("AWS_REGION", "eu-central-1"), ("WEIR_ALLOW_NON_EU", "yes")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
        let cfg = cfg.with_env(&env).unwrap();
        assert_eq!(cfg.lake_or_default(), "s3://b-1/x");
        assert_eq!(cfg.s3.region.as_deref(), Some("eu-central-1"));
        assert!(cfg.allow_non_eu);
        assert_eq!(cfg.small_file_rows, None);
        let rows = |v: &str| {
            let env = HashMap::from([("WEIR_SMALL_FILE_ROWS".to_string(), v.to_string())]);
            Config::from_toml("small_file_rows = 100", "weir.toml").unwrap().with_env(&env)
        };
        assert_eq!(rows("").unwrap().small_file_rows, Some(100), "an empty variable leaves the file's value");
        assert_eq!(rows("0").unwrap().small_file_rows, Some(0));
        let err = rows("many").unwrap_err().to_string();
        assert!(err.contains("WEIR_SMALL_FILE_ROWS") && err.contains("many"), "{err}");
    }

    #[test]
    fn malformed_config_names_the_file() {
        let err = Config::from_toml("pg_url = ", "conf/weir.toml").unwrap_err();
        assert!(err.to_string().starts_with("malformed config conf/weir.toml"), "{err}");
        let err = Config::from_toml("pgurl = 'x'", "weir.toml").unwrap_err();
        assert!(err.to_string().contains("pgurl"), "{err}");
        let env: HashMap<String, String> = [("AWS_ALLOW_HTTP".to_string(), "maybe".to_string())].into_iter().collect();
        assert!(Config::default().with_env(&env).is_err());
    }
}
