//! A local lake's object store: `object_store`'s `LocalFileSystem`, with range reads done
//! where they are asked for.
//!
//! `LocalFileSystem` hands every read to tokio's blocking pool: a ranged `get` opens the
//! file and reads its metadata on one pool thread and the bytes on another, each a wake-up
//! and a switch back. A Parquet reader asks for a footer and then a range per column chunk, so
//! a day's derive made ≈ 29k futex calls and ≈ 5k opens for ≈ 10k reads (`strace -c`). A
//! range of a local file that is already in the page cache is read in microseconds. Here it is
//! read in the calling task: one open, one `fstat` and a positioned read. Everything else (a
//! read with preconditions or of a whole object, writes, listings, copies, deletes) goes to
//! `LocalFileSystem` unchanged. A local lake's [`crate::Lake`] store is one, and delta-rs opens
//! every `file://` table through one ([`register_for_delta`]): its DataFusion scans, log reads
//! and checkpoints included.
//!
//! Only for local files: a read that misses the page cache waits for the disk in the calling
//! task. An `s3://` lake's reads are requests and keep `object_store`'s own client.
//!
//! The object metadata of a read is the one `LocalFileSystem` reports (the same ETag of inode,
//! modification time and size), so conditional requests made with it behave the same.

use std::fs::{File, Metadata};
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path as FsPath;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    Attributes, CopyOptions, GetOptions, GetRange, GetResult, GetResultPayload, ListResult, MultipartUpload,
    ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

/// [`LocalFileSystem`] with ranged reads served in the calling task.
#[derive(Debug)]
pub struct InlineLocal {
    inner: LocalFileSystem,
}

impl InlineLocal {
    pub fn new(inner: LocalFileSystem) -> Self {
        InlineLocal { inner }
    }
}

impl std::fmt::Display for InlineLocal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InlineLocal({})", self.inner)
    }
}

fn open(path: &FsPath) -> Result<File> {
    File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => {
            object_store::Error::NotFound { path: path.display().to_string(), source: source.into() }
        }
        _ => object_store::Error::Generic {
            store: "InlineLocal",
            source: format!("opening {}: {source}", path.display()).into(),
        },
    })
}

fn read_at(file: &File, path: &FsPath, range: Range<u64>) -> Result<Bytes> {
    let mut buf = vec![0u8; (range.end - range.start) as usize];
    file.read_exact_at(&mut buf, range.start).map_err(|source| object_store::Error::Generic {
        store: "InlineLocal",
        source: format!("reading bytes {}..{} of {}: {source}", range.start, range.end, path.display()).into(),
    })?;
    Ok(Bytes::from(buf))
}

/// The metadata `LocalFileSystem` reports for a file.
fn meta_of(m: &Metadata, location: Path) -> ObjectMeta {
    let modified = m.modified().ok();
    let micros =
        modified.and_then(|t| t.duration_since(std::time::SystemTime::UNIX_EPOCH).ok()).unwrap_or_default().as_micros();
    ObjectMeta {
        location,
        last_modified: modified.map(Into::into).unwrap_or_default(),
        size: m.len(),
        e_tag: Some(format!("{:x}-{micros:x}-{:x}", m.ino(), m.len())),
        version: None,
    }
}

/// A plain ranged read: a range within the object, no preconditions, no version.
fn plain_range(o: &GetOptions) -> Option<Range<u64>> {
    let plain = o.if_match.is_none()
        && o.if_none_match.is_none()
        && o.if_modified_since.is_none()
        && o.if_unmodified_since.is_none()
        && o.version.is_none()
        && !o.head;
    match (&o.range, plain) {
        (Some(GetRange::Bounded(r)), true) if r.start < r.end => Some(r.clone()),
        _ => None,
    }
}

#[async_trait]
impl ObjectStore for InlineLocal {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let Some(range) = plain_range(&options) else {
            return self.inner.get_opts(location, options).await;
        };
        let path = self.inner.path_to_filesystem(location)?;
        let file = open(&path)?;
        let m = file.metadata().map_err(|e| object_store::Error::Generic {
            store: "InlineLocal",
            source: format!("reading the metadata of {}: {e}", path.display()).into(),
        })?;
        if m.is_dir() || range.start >= m.len() {
            // A directory, or a range past the end: LocalFileSystem's own error.
            return self.inner.get_opts(location, options).await;
        }
        let range = range.start..range.end.min(m.len());
        let bytes = read_at(&file, &path, range.clone())?;
        Ok(GetResult {
            payload: GetResultPayload::Stream(Box::pin(futures::stream::once(async move { Ok(bytes) }))),
            meta: meta_of(&m, location.clone()),
            range,
            attributes: Attributes::default(),
        })
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let path = self.inner.path_to_filesystem(location)?;
        let file = open(&path)?;
        let len = file.metadata().map(|m| m.len()).ok();
        if ranges.iter().any(|r| r.start > r.end || len.is_none_or(|len| r.end > len)) {
            // A range past the end: LocalFileSystem's own error.
            return self.inner.get_ranges(location, ranges).await;
        }
        ranges.iter().map(|r| read_at(&file, &path, r.clone())).collect()
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(&self, prefix: Option<&Path>, offset: &Path) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

/// Delta's store for `file://` tables: [`InlineLocal`] over the file system's root, as
/// delta-rs's default factory builds a `LocalFileSystem` (a URL with a host or another
/// scheme is left to that default).
struct InlineLocalFactory;

impl deltalake::logstore::ObjectStoreFactory for InlineLocalFactory {
    fn parse_url_opts(
        &self,
        url: &url::Url,
        _config: &deltalake::logstore::StorageConfig,
    ) -> deltalake::DeltaResult<(deltalake::logstore::ObjectStoreRef, Path)> {
        if url.scheme() == "file" && url.host_str().is_none() {
            let path = Path::parse(url.path())?;
            return Ok((std::sync::Arc::new(InlineLocal::new(LocalFileSystem::new())), path));
        }
        let (store, path) = object_store::parse_url_opts(url, std::iter::empty::<(String, String)>())?;
        Ok((std::sync::Arc::from(store), path))
    }
}

/// Makes delta-rs open `file://` tables through [`InlineLocal`] (once per process).
pub fn register_for_delta() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let file = url::Url::parse("file://").expect("a valid URL");
        deltalake::logstore::object_store_factories().insert(file, std::sync::Arc::new(InlineLocalFactory));
    });
}
