//! A small S3-compatible server for tests, benchmarks, the demo and local use.
//!
//! It is `s3s-fs` (objects stored as files, SigV4 authentication, path-style requests) behind a
//! thin wrapper that makes writes to one key mutually exclusive. Stock `s3s-fs` checks
//! `If-None-Match: *` and `If-Match` before it writes, without a lock, so several racing
//! conditional writers can all win; Delta's commit protocol depends on exactly one winner.
//! The wrapper holds a per-key lock around PutObject, CopyObject, CompleteMultipartUpload and
//! DeleteObject, and reports a configured region from GetBucketLocation so that region checks
//! can be exercised.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::dto::{BucketLocationConstraint, GetBucketLocationInput, GetBucketLocationOutput};
use s3s::{S3, S3Request, S3Response, S3Result, dto};
use tokio::net::TcpListener;
use tokio::sync::{OwnedMutexGuard, watch};

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum S3ServerError {
    #[error("cannot use {path} as the S3 server's data directory: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("cannot open the S3 server's data directory {path}: {message}")]
    Fs { path: PathBuf, message: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
}

/// How to run a server.
#[derive(Debug, Clone)]
pub struct S3ServerConfig {
    /// Directory holding one sub-directory per bucket.
    pub root: PathBuf,
    /// Address to listen on; port 0 picks a free port.
    pub addr: SocketAddr,
    pub access_key: String,
    pub secret_key: String,
    /// The region GetBucketLocation reports for every bucket.
    pub region: String,
    /// Buckets to create at start (idempotent).
    pub buckets: Vec<String>,
}

impl S3ServerConfig {
    /// A loopback server on a free port with Weir's static test credentials.
    pub fn local(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            access_key: DEFAULT_ACCESS_KEY.to_string(),
            secret_key: DEFAULT_SECRET_KEY.to_string(),
            region: DEFAULT_REGION.to_string(),
            buckets: vec![],
        }
    }
}

pub const DEFAULT_ACCESS_KEY: &str = "weir-access-key";
pub const DEFAULT_SECRET_KEY: &str = "weir-secret-key";
pub const DEFAULT_REGION: &str = "eu-central-1";

type KeyLocks = Mutex<HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>>;

/// `s3s_fs::FileSystem` with per-key write locks and a configured region.
pub struct LockedFs {
    inner: s3s_fs::FileSystem,
    locks: KeyLocks,
    region: String,
}

impl std::fmt::Debug for LockedFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockedFs").field("region", &self.region).finish()
    }
}

impl LockedFs {
    pub fn new(root: &Path, region: &str) -> Result<Self, S3ServerError> {
        let inner = s3s_fs::FileSystem::new(root)
            .map_err(|e| S3ServerError::Fs { path: root.to_path_buf(), message: format!("{e:?}") })?;
        Ok(Self { inner, locks: Mutex::new(HashMap::new()), region: region.to_string() })
    }

    async fn lock(&self, bucket: &str, key: &str) -> KeyGuard<'_> {
        let id = (bucket.to_string(), key.to_string());
        let cell = {
            let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(id.clone()).or_default().clone()
        };
        let guard = cell.lock_owned().await;
        KeyGuard { locks: &self.locks, id, guard: Some(guard) }
    }
}

/// Releases the key's lock and forgets the key's entry once nobody else waits on it.
struct KeyGuard<'a> {
    locks: &'a KeyLocks,
    id: (String, String),
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cell) = map.get(&self.id)
            && Arc::strong_count(cell) == 1
        {
            map.remove(&self.id);
        }
    }
}

#[async_trait::async_trait]
impl S3 for LockedFs {
    // Reads and non-conflicting writes go straight to s3s-fs.
    async fn create_bucket(
        &self,
        req: S3Request<dto::CreateBucketInput>,
    ) -> S3Result<S3Response<dto::CreateBucketOutput>> {
        self.inner.create_bucket(req).await
    }

    async fn delete_bucket(
        &self,
        req: S3Request<dto::DeleteBucketInput>,
    ) -> S3Result<S3Response<dto::DeleteBucketOutput>> {
        self.inner.delete_bucket(req).await
    }

    async fn delete_objects(
        &self,
        req: S3Request<dto::DeleteObjectsInput>,
    ) -> S3Result<S3Response<dto::DeleteObjectsOutput>> {
        self.inner.delete_objects(req).await
    }

    async fn get_object(&self, req: S3Request<dto::GetObjectInput>) -> S3Result<S3Response<dto::GetObjectOutput>> {
        self.inner.get_object(req).await
    }

    async fn head_bucket(&self, req: S3Request<dto::HeadBucketInput>) -> S3Result<S3Response<dto::HeadBucketOutput>> {
        self.inner.head_bucket(req).await
    }

    async fn head_object(&self, req: S3Request<dto::HeadObjectInput>) -> S3Result<S3Response<dto::HeadObjectOutput>> {
        self.inner.head_object(req).await
    }

    async fn list_buckets(
        &self,
        req: S3Request<dto::ListBucketsInput>,
    ) -> S3Result<S3Response<dto::ListBucketsOutput>> {
        self.inner.list_buckets(req).await
    }

    async fn list_objects(
        &self,
        req: S3Request<dto::ListObjectsInput>,
    ) -> S3Result<S3Response<dto::ListObjectsOutput>> {
        self.inner.list_objects(req).await
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<dto::ListObjectsV2Input>,
    ) -> S3Result<S3Response<dto::ListObjectsV2Output>> {
        self.inner.list_objects_v2(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<dto::CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<dto::CreateMultipartUploadOutput>> {
        self.inner.create_multipart_upload(req).await
    }

    async fn upload_part(&self, req: S3Request<dto::UploadPartInput>) -> S3Result<S3Response<dto::UploadPartOutput>> {
        self.inner.upload_part(req).await
    }

    async fn upload_part_copy(
        &self,
        req: S3Request<dto::UploadPartCopyInput>,
    ) -> S3Result<S3Response<dto::UploadPartCopyOutput>> {
        self.inner.upload_part_copy(req).await
    }

    async fn list_parts(&self, req: S3Request<dto::ListPartsInput>) -> S3Result<S3Response<dto::ListPartsOutput>> {
        self.inner.list_parts(req).await
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<dto::AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<dto::AbortMultipartUploadOutput>> {
        self.inner.abort_multipart_upload(req).await
    }

    async fn put_object(&self, req: S3Request<dto::PutObjectInput>) -> S3Result<S3Response<dto::PutObjectOutput>> {
        let _g = self.lock(&req.input.bucket, &req.input.key).await;
        self.inner.put_object(req).await
    }

    async fn copy_object(&self, req: S3Request<dto::CopyObjectInput>) -> S3Result<S3Response<dto::CopyObjectOutput>> {
        let _g = self.lock(&req.input.bucket, &req.input.key).await;
        self.inner.copy_object(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<dto::CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<dto::CompleteMultipartUploadOutput>> {
        let _g = self.lock(&req.input.bucket, &req.input.key).await;
        self.inner.complete_multipart_upload(req).await
    }

    async fn delete_object(
        &self,
        req: S3Request<dto::DeleteObjectInput>,
    ) -> S3Result<S3Response<dto::DeleteObjectOutput>> {
        let _g = self.lock(&req.input.bucket, &req.input.key).await;
        self.inner.delete_object(req).await
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        // Existence check (NoSuchBucket) by the inner implementation, then our region.
        self.inner.get_bucket_location(req).await?;
        // us-east-1 is reported as an absent constraint, as AWS does.
        let location_constraint =
            (self.region != "us-east-1").then(|| BucketLocationConstraint::from(self.region.clone()));
        Ok(S3Response::new(GetBucketLocationOutput { location_constraint }))
    }
}

/// A running server. Dropping it stops the server (connections in flight are cut).
#[derive(Debug)]
pub struct S3Server {
    addr: SocketAddr,
    config: S3ServerConfig,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl S3Server {
    /// Binds and starts serving on the current tokio runtime.
    pub async fn start(config: S3ServerConfig) -> Result<Self, S3ServerError> {
        std::fs::create_dir_all(&config.root)
            .map_err(|source| S3ServerError::DataDir { path: config.root.clone(), source })?;
        for bucket in &config.buckets {
            let dir = config.root.join(bucket);
            std::fs::create_dir_all(&dir).map_err(|source| S3ServerError::DataDir { path: dir.clone(), source })?;
        }
        let fs = LockedFs::new(&config.root, &config.region)?;
        let service = {
            let mut b = s3s::service::S3ServiceBuilder::new(fs);
            b.set_auth(s3s::auth::SimpleAuth::from_single(config.access_key.clone(), config.secret_key.clone()));
            b.build()
        };
        let listener = TcpListener::bind(config.addr)
            .await
            .map_err(|source| S3ServerError::Bind { addr: config.addr.to_string(), source })?;
        let addr =
            listener.local_addr().map_err(|source| S3ServerError::Bind { addr: config.addr.to_string(), source })?;
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let socket = tokio::select! {
                    res = listener.accept() => match res {
                        Ok((socket, _)) => socket,
                        Err(err) => {
                            tracing::warn!("s3 server: accept failed: {err}");
                            continue;
                        }
                    },
                    _ = stopped.changed() => break,
                };
                let conn = http.serve_connection(TokioIo::new(socket), service.clone()).into_owned();
                conns.spawn(async move {
                    if let Err(err) = conn.await {
                        tracing::debug!("s3 server: connection ended: {err}");
                    }
                });
                while conns.try_join_next().is_some() {}
            }
            conns.abort_all();
        });
        tracing::info!(%addr, root = %config.root.display(), region = %config.region, "S3 server listening");
        Ok(Self { addr, config, stop, task: Some(task) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, the endpoint clients are given.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn config(&self) -> &S3ServerConfig {
        &self.config
    }

    /// Stops accepting and cuts open connections; waits until the listener is closed.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
