//! Where the lake lives: a local folder (`file://…` or a plain path) or `s3://bucket/prefix`,
//! and the EU residency rule for S3 buckets.

use std::path::{Path, PathBuf};

use url::Url;

/// AWS regions inside the European Union. London (eu-west-2) and Zurich (eu-central-2) are in
/// Europe but not in the EU, so they are not here. `eusc-de-east-1` is the European Sovereign
/// Cloud (Brandenburg).
pub const EU_REGIONS: &[&str] =
    &["eu-central-1", "eu-west-1", "eu-west-3", "eu-north-1", "eu-south-1", "eu-south-2", "eusc-de-east-1"];

pub fn is_eu_region(region: &str) -> bool {
    EU_REGIONS.contains(&region.trim().to_ascii_lowercase().as_str())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LakeError {
    #[error("invalid lake URI {uri:?}: {reason}")]
    Uri { uri: String, reason: String },
    #[error(
        "bucket {bucket:?} is in region {region:?}, outside the EU ({}); pass --allow-non-eu to use it anyway",
        EU_REGIONS.join(", ")
    )]
    NonEu { bucket: String, region: String },
    #[error("the region of bucket {bucket:?} is unknown: set s3.region in weir.toml or AWS_REGION")]
    UnknownRegion { bucket: String },
}

/// A parsed lake location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LakeLocation {
    Local { root: PathBuf },
    S3 { bucket: String, prefix: String },
}

impl LakeLocation {
    /// Parses `file:///abs`, `file://./rel`, a plain path, or `s3://bucket[/prefix]`.
    /// Relative paths are resolved against `cwd`.
    pub fn parse(uri: &str, cwd: &Path) -> Result<Self, LakeError> {
        let bad = |reason: &str| LakeError::Uri { uri: uri.to_string(), reason: reason.to_string() };
        let trimmed = uri.trim();
        if trimmed.is_empty() {
            return Err(bad("it is empty"));
        }
        if let Some(rest) = trimmed.strip_prefix("file://") {
            if rest.is_empty() {
                return Err(bad("file:// needs a path"));
            }
            return Ok(Self::Local { root: absolutize(Path::new(rest), cwd) });
        }
        if trimmed.starts_with("s3://") {
            let url = Url::parse(trimmed).map_err(|e| bad(&e.to_string()))?;
            let bucket = url.host_str().unwrap_or_default().to_string();
            if !valid_bucket(&bucket) {
                return Err(bad("the bucket name must be 3-63 characters of a-z, 0-9, '.' and '-'"));
            }
            let prefix = url.path().trim_matches('/').to_string();
            return Ok(Self::S3 { bucket, prefix });
        }
        if let Some((scheme, _)) = trimmed.split_once("://") {
            return Err(bad(&format!("unsupported scheme {scheme:?}: use file:// or s3://")));
        }
        Ok(Self::Local { root: absolutize(Path::new(trimmed), cwd) })
    }

    /// The URL form: `file:///abs/path/` or `s3://bucket/prefix/`.
    pub fn url(&self) -> Url {
        match self {
            Self::Local { root } => Url::from_directory_path(root).expect("an absolute path is a valid file URL"),
            Self::S3 { bucket, prefix } => {
                let p = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
                Url::parse(&format!("s3://{bucket}/{p}")).expect("validated bucket name")
            }
        }
    }

    /// The location of a table under the lake, e.g. `bronze/listings`.
    pub fn table_url(&self, rel: &str) -> Url {
        self.url().join(&format!("{}/", rel.trim_matches('/'))).expect("relative table path")
    }
}

fn absolutize(p: &Path, cwd: &Path) -> PathBuf {
    let joined = if p.is_absolute() { p.to_path_buf() } else { cwd.join(p) };
    // Lexical clean-up of `.` and `..`, without touching the file system.
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && b.starts_with(|c: char| c.is_ascii_alphanumeric())
        && b.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// The EU residency rule: an S3 bucket must be in an EU region unless explicitly allowed.
pub fn check_eu_region(bucket: &str, region: Option<&str>, allow_non_eu: bool) -> Result<(), LakeError> {
    match region {
        _ if allow_non_eu => Ok(()),
        Some(r) if is_eu_region(r) => Ok(()),
        Some(r) => Err(LakeError::NonEu { bucket: bucket.to_string(), region: r.to_string() }),
        None => Err(LakeError::UnknownRegion { bucket: bucket.to_string() }),
    }
}

/// The region in a GetBucketLocation answer: empty means us-east-1, "EU" means eu-west-1.
pub fn parse_bucket_location(xml: &str) -> String {
    let inner = xml
        .split("<LocationConstraint")
        .nth(1)
        .and_then(|r| r.split_once('>'))
        .map(|(attrs, rest)| if attrs.ends_with('/') { "" } else { rest.split('<').next().unwrap_or("") })
        .unwrap_or("")
        .trim();
    match inner {
        "" => "us-east-1".to_string(),
        "EU" => "eu-west-1".to_string(),
        r => r.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        let cwd = Path::new("/home/u/proj");
        assert_eq!(
            LakeLocation::parse("file://./.weir/lake", cwd).unwrap(),
            LakeLocation::Local { root: "/home/u/proj/.weir/lake".into() }
        );
        assert_eq!(LakeLocation::parse("/data/lake", cwd).unwrap(), LakeLocation::Local { root: "/data/lake".into() });
        let s3 = LakeLocation::parse("s3://weir-lake/prod/eu", cwd).unwrap();
        assert_eq!(s3, LakeLocation::S3 { bucket: "weir-lake".into(), prefix: "prod/eu".into() });
        assert_eq!(s3.table_url("bronze/listings").as_str(), "s3://weir-lake/prod/eu/bronze/listings/");
        let local = LakeLocation::parse("file:///tmp/l", cwd).unwrap();
        assert_eq!(local.table_url("bronze/price_log").as_str(), "file:///tmp/l/bronze/price_log/");
    }

    #[test]
    fn rejects_bad_uris() {
        let cwd = Path::new("/");
        for bad in ["", "gs://bucket/x", "s3://", "s3://Bad_Bucket/x", "s3://ab", "file://"] {
            assert!(LakeLocation::parse(bad, cwd).is_err(), "{bad}");
        }
    }

    #[test]
    fn eu_residency() {
        assert!(check_eu_region("b", Some("eu-central-1"), false).is_ok());
        assert!(check_eu_region("b", Some("EU-WEST-3"), false).is_ok());
        let err = check_eu_region("b", Some("us-east-1"), false).unwrap_err();
        assert!(err.to_string().contains("--allow-non-eu"), "{err}");
        assert!(check_eu_region("b", Some("eu-west-2"), false).is_err(), "London is not in the EU");
        assert!(check_eu_region("b", Some("eu-central-2"), false).is_err(), "Zurich is not in the EU");
        assert!(check_eu_region("b", Some("us-east-1"), true).is_ok());
        assert!(check_eu_region("b", None, false).is_err());
    }

    #[test]
    fn location_answers() {
        let ns = "xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"";
        assert_eq!(
            parse_bucket_location(&format!("<LocationConstraint {ns}>eu-central-1</LocationConstraint>")),
            "eu-central-1"
        );
        assert_eq!(parse_bucket_location(&format!("<LocationConstraint {ns}/>")), "us-east-1");
        assert_eq!(parse_bucket_location(&format!("<LocationConstraint {ns}></LocationConstraint>")), "us-east-1");
        assert_eq!(
            parse_bucket_location("<?xml version=\"1.0\"?><LocationConstraint>EU</LocationConstraint>"),
            "eu-west-1"
        );
    }
}
