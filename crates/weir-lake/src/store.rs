//! Opening a lake: object store, storage options for Delta/Lance, EU residency.

use std::collections::HashMap;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut, S3CopyIfNotExists};
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use url::Url;
use weir_core::{LakeError, LakeLocation, S3Settings, check_eu_region};

#[derive(Debug, thiserror::Error)]
pub enum LakeStoreError {
    #[error(transparent)]
    Location(#[from] LakeError),
    #[error("cannot open lake {url}: {message}")]
    Open { url: String, message: String },
    #[error("cannot learn the region of bucket {bucket:?} (set s3.region in weir.toml or AWS_REGION): {message}")]
    Region { bucket: String, message: String },
    #[error("lake {url}: {what}: {message}")]
    Io { url: String, what: String, message: String },
}

/// The layers whose tables Weir writes, each table a folder under `<lake>/<layer>/`.
pub const LAYERS: [&str; 3] = ["bronze", "silver", "gold"];

/// An opened lake.
#[derive(Clone)]
pub struct Lake {
    pub location: LakeLocation,
    store: Arc<dyn ObjectStore>,
    prefix: StorePath,
    storage_options: HashMap<String, String>,
    small_file_rows: u64,
}

impl std::fmt::Debug for Lake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lake").field("location", &self.location).field("prefix", &self.prefix).finish()
    }
}

/// The region an S3 bucket reports (GetBucketLocation, signed with SigV4 when credentials
/// are configured). Against AWS itself without credentials, the unsigned HeadBucket answer.
pub async fn bucket_region(bucket: &str, s3: &S3Settings) -> Result<String, LakeStoreError> {
    use object_store::aws::{AwsAuthorizer, AwsCredential};
    use object_store::client::{HttpConnector, HttpRequestBody, ReqwestConnector};

    let err = |message: String| LakeStoreError::Region { bucket: bucket.to_string(), message };
    let (Some(key), Some(secret)) = (&s3.access_key_id, &s3.secret_access_key) else {
        if s3.endpoint.is_some() {
            return Err(err(
                "no credentials to ask the endpoint with (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)".into()
            ));
        }
        return object_store::aws::resolve_bucket_region(bucket, &client_options())
            .await
            .map_err(|e| err(e.to_string()));
    };
    let endpoint = s3.endpoint.clone().unwrap_or_else(|| "https://s3.amazonaws.com".to_string());
    let url = format!("{}/{bucket}?location", endpoint.trim_end_matches('/'));
    let client = ReqwestConnector::default()
        .connect(&client_options().with_allow_http(allow_http(s3)))
        .map_err(|e| err(e.to_string()))?;
    let mut request = http::Request::builder()
        .method("GET")
        .uri(&url)
        .body(HttpRequestBody::empty())
        .map_err(|e| err(format!("bad endpoint {endpoint:?}: {e}")))?;
    let credential = AwsCredential { key_id: key.clone(), secret_key: secret.clone(), token: s3.session_token.clone() };
    // GetBucketLocation may be asked of any region; us-east-1 is the one every endpoint accepts.
    AwsAuthorizer::new(&credential, "s3", "us-east-1").authorize(&mut request, None);
    let response = client.execute(request).await.map_err(|e| err(format!("GET {url}: {e}")))?;
    let status = response.status();
    let body = response.into_body().bytes().await.map_err(|e| err(format!("GET {url}: {e}")))?;
    let text = String::from_utf8_lossy(&body);
    if !status.is_success() {
        let code = text.split("<Code>").nth(1).and_then(|r| r.split('<').next()).unwrap_or("");
        return Err(err(format!("GET {url}: HTTP {status} {code}")));
    }
    Ok(weir_core::parse_bucket_location(&text))
}

fn client_options() -> object_store::ClientOptions {
    object_store::ClientOptions::new()
        .with_connect_timeout(std::time::Duration::from_secs(5))
        .with_timeout(std::time::Duration::from_secs(20))
}

impl Lake {
    /// Opens the lake; for an `s3://` lake without a configured region, the bucket's reported
    /// region decides (see [`bucket_region`]).
    pub async fn open_resolving(
        location: LakeLocation,
        s3: &S3Settings,
        allow_non_eu: bool,
    ) -> Result<Self, LakeStoreError> {
        if let LakeLocation::S3 { bucket, .. } = &location
            && s3.region.is_none()
        {
            let region = bucket_region(bucket, s3).await?;
            tracing::info!(bucket, region, "region from the bucket's location");
            let s3 = S3Settings { region: Some(region), ..s3.clone() };
            return Self::open(location, &s3, allow_non_eu);
        }
        Self::open(location, s3, allow_non_eu)
    }

    /// Opens the lake. An `s3://` lake must name an EU region (config or `AWS_REGION`) unless
    /// `allow_non_eu`; a local lake's folder is created when missing.
    pub fn open(location: LakeLocation, s3: &S3Settings, allow_non_eu: bool) -> Result<Self, LakeStoreError> {
        let url = location.url();
        let open_err = |message: String| LakeStoreError::Open { url: url.to_string(), message };
        match &location {
            LakeLocation::Local { root } => {
                std::fs::create_dir_all(root)
                    .map_err(|e| open_err(format!("cannot create {}: {e}", root.display())))?;
                let store = LocalFileSystem::new_with_prefix(root).map_err(|e| open_err(e.to_string()))?;
                crate::local::register_for_delta();
                Ok(Self {
                    location,
                    store: Arc::new(crate::InlineLocal::new(store)),
                    prefix: StorePath::default(),
                    storage_options: HashMap::new(),
                    small_file_rows: crate::dv::SMALL_FILE_ROWS,
                })
            }
            LakeLocation::S3 { bucket, prefix } => {
                check_eu_region(bucket, s3.region.as_deref(), allow_non_eu)?;
                let options = s3_storage_options(s3);
                let mut b = AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_conditional_put(S3ConditionalPut::ETagMatch)
                    .with_copy_if_not_exists(S3CopyIfNotExists::Multipart);
                if let Some(r) = &s3.region {
                    b = b.with_region(r);
                }
                if let Some(e) = &s3.endpoint {
                    b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
                }
                if let Some(k) = &s3.access_key_id {
                    b = b.with_access_key_id(k);
                }
                if let Some(k) = &s3.secret_access_key {
                    b = b.with_secret_access_key(k);
                }
                if let Some(t) = &s3.session_token {
                    b = b.with_token(t);
                }
                b = b.with_allow_http(allow_http(s3));
                let store = b.build().map_err(|e| open_err(e.to_string()))?;
                Ok(Self {
                    location: location.clone(),
                    store: Arc::new(store),
                    prefix: StorePath::from(prefix.as_str()),
                    storage_options: options,
                    small_file_rows: crate::dv::SMALL_FILE_ROWS,
                })
            }
        }
    }

    /// A merge folds the table's files of fewer live rows than this into its new files
    /// (see [`crate::dv`]); 0 keeps every file and marks deleted rows only.
    pub fn with_small_file_rows(mut self, rows: u64) -> Self {
        self.small_file_rows = rows;
        self
    }

    pub fn small_file_rows(&self) -> u64 {
        self.small_file_rows
    }

    pub fn store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// The store path of `rel` under the lake root.
    pub fn path(&self, rel: &str) -> StorePath {
        self.prefix.parts().chain(StorePath::from(rel).parts()).collect()
    }

    pub fn url(&self) -> Url {
        self.location.url()
    }

    pub fn table_url(&self, rel: &str) -> Url {
        self.location.table_url(rel)
    }

    /// Makes sure a table location can be opened: a local lake needs the folder to exist
    /// (object stores have no folders).
    pub fn prepare_table_dir(&self, rel: &str) -> Result<(), LakeStoreError> {
        if let LakeLocation::Local { root } = &self.location {
            let dir = root.join(rel.trim_matches('/'));
            std::fs::create_dir_all(&dir).map_err(|e| LakeStoreError::Open {
                url: self.url().to_string(),
                message: format!("cannot create {}: {e}", dir.display()),
            })?;
        }
        Ok(())
    }

    /// An error of this lake's store while doing `what`.
    pub fn io_err(&self, what: impl Into<String>) -> impl FnOnce(object_store::Error) -> LakeStoreError + '_ {
        let what = what.into();
        move |e| LakeStoreError::Io { url: self.url().to_string(), what, message: e.to_string() }
    }

    /// The table folders directly under a layer, sorted (none when the layer has no folder).
    pub async fn table_names(&self, layer: &str) -> Result<Vec<String>, LakeStoreError> {
        let listing = match self.store.list_with_delimiter(Some(&self.path(layer))).await {
            Ok(l) => l,
            Err(object_store::Error::NotFound { .. }) => return Ok(vec![]),
            Err(e) => return Err(self.io_err(format!("listing {layer}/"))(e)),
        };
        let mut names: Vec<String> =
            listing.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect();
        names.sort();
        Ok(names)
    }

    /// Options for deltalake and lance (empty for a local lake).
    pub fn storage_options(&self) -> &HashMap<String, String> {
        &self.storage_options
    }
}

fn allow_http(s3: &S3Settings) -> bool {
    s3.allow_http.unwrap_or_else(|| s3.endpoint.as_deref().is_some_and(|e| e.starts_with("http://")))
}

fn s3_storage_options(s3: &S3Settings) -> HashMap<String, String> {
    let mut o = HashMap::new();
    let mut put = |k: &str, v: Option<&String>| {
        if let Some(v) = v {
            o.insert(k.to_string(), v.clone());
        }
    };
    put("aws_region", s3.region.as_ref());
    put("aws_endpoint", s3.endpoint.as_ref());
    put("aws_access_key_id", s3.access_key_id.as_ref());
    put("aws_secret_access_key", s3.secret_access_key.as_ref());
    put("aws_session_token", s3.session_token.as_ref());
    if s3.endpoint.is_some() {
        o.insert("aws_virtual_hosted_style_request".into(), "false".into());
    }
    o.insert("aws_allow_http".into(), allow_http(s3).to_string());
    o.insert("aws_conditional_put".into(), "etag".into());
    o.insert("aws_copy_if_not_exists".into(), "multipart".into());
    o
}
