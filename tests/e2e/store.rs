//! The local lake's object store (`weir_lake::InlineLocal`): its reads answer as
//! `object_store`'s `LocalFileSystem` does, bytes, metadata and errors.

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};
use weir_lake::InlineLocal;

/// Ranged reads, whole reads and their errors answer as `LocalFileSystem` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_as_local_file_system_does() {
    let dir = tempfile::tempdir().unwrap();
    let plain = LocalFileSystem::new_with_prefix(dir.path()).unwrap();
    let inline = InlineLocal::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let p = Path::from("t/part-0.parquet");
    inline.put(&p, PutPayload::from(data.clone())).await.unwrap();

    for r in [0..1, 0..10_000, 9_992..10_000, 4_000..6_000, 9_000..12_000] {
        let a = plain.get_range(&p, r.clone()).await.unwrap();
        let b = inline.get_range(&p, r.clone()).await.unwrap();
        assert_eq!(a, b, "range {r:?}");
        let end = r.end.min(10_000) as usize;
        assert_eq!(&b[..], &data[r.start as usize..end], "range {r:?}");
    }
    let ranges = [0..8, 100..4_100, 9_000..10_000];
    assert_eq!(plain.get_ranges(&p, &ranges).await.unwrap(), inline.get_ranges(&p, &ranges).await.unwrap());
    let opts = GetOptions { range: Some(GetRange::Bounded(10..20)), ..Default::default() };
    let (a, b) = (plain.get_opts(&p, opts.clone()).await.unwrap(), inline.get_opts(&p, opts).await.unwrap());
    assert_eq!((a.meta.clone(), a.range.clone()), (b.meta.clone(), b.range.clone()));
    assert_eq!(a.bytes().await.unwrap(), b.bytes().await.unwrap());
    assert_eq!(inline.get(&p).await.unwrap().bytes().await.unwrap(), Bytes::from(data));

    // A missing object is NotFound; a range past the end is an error, as before.
    let missing = Path::from("t/none.parquet");
    assert!(matches!(inline.get_range(&missing, 0..4).await, Err(object_store::Error::NotFound { .. })));
    assert!(matches!(inline.get_ranges(&missing, &[0..4, 8..12]).await, Err(object_store::Error::NotFound { .. })));
    assert!(inline.get_range(&p, 20_000..20_004).await.is_err());
    assert!(inline.get_ranges(&p, &[0..4, 9_999..10_004]).await.is_err());
    // A precondition is checked (by LocalFileSystem).
    let stale =
        GetOptions { if_match: Some("nope".into()), range: Some(GetRange::Bounded(0..4)), ..Default::default() };
    assert!(matches!(inline.get_opts(&p, stale).await, Err(object_store::Error::Precondition { .. })));
}

/// delta-rs opens `file://` tables through `InlineLocal` once a local lake is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_opens_local_tables_inline() {
    let dir = tempfile::tempdir().unwrap();
    let location = weir_core::LakeLocation::Local { root: dir.path().to_path_buf() };
    let lake = weir_lake::Lake::open(location, &weir_core::S3Settings::default(), false).unwrap();
    let url = lake.table_url("bronze/t");
    // The registry's key for the scheme: file:///
    let factories = deltalake::logstore::object_store_factories();
    let factory = factories.get(&url.join("/").unwrap()).unwrap();
    let (store, path) = factory.value().parse_url_opts(&url, &Default::default()).unwrap();
    assert!(store.to_string().starts_with("InlineLocal"), "{store}");
    assert_eq!(path.as_ref(), url.path().trim_matches('/'));
    let file = path.clone().join("part-0.parquet");
    store.put(&file, PutPayload::from(vec![7u8; 100])).await.unwrap();
    assert_eq!(store.get_range(&file, 10..20).await.unwrap(), Bytes::from(vec![7u8; 10]));
}
