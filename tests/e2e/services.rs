//! The local services themselves: the PostgreSQL cluster and the S3 server's one-winner rule.

use std::sync::Arc;

use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use weir_core::{LakeLocation, S3Settings};
use weir_lake::Lake;
use weir_testkit::{PgCluster, S3Server, S3ServerConfig};

use crate::common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cluster_is_logical_and_removed_on_drop() {
    let pg = tokio::task::spawn_blocking(PgCluster::start).await.unwrap().unwrap();
    let c = common::client(&pg.url("postgres")).await;
    let wal: String = c.query_one("SHOW wal_level", &[]).await.unwrap().get(0);
    assert_eq!(wal, "logical");
    let version: i32 = c.query_one("SHOW server_version_num", &[]).await.unwrap().get::<_, String>(0).parse().unwrap();
    assert!((150_000..160_000).contains(&version), "PostgreSQL 15 expected, got {version}");
    let dir = pg.data_dir().to_path_buf();
    assert!(dir.join("PG_VERSION").is_file());
    drop(c);
    drop(pg);
    assert!(!dir.exists(), "{} should be removed on drop", dir.display());
}

async fn s3_server() -> (S3Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = S3ServerConfig::local(dir.path());
    cfg.buckets = vec!["race".into(), "lake".into()];
    (S3Server::start(cfg).await.unwrap(), dir)
}

fn client_for(server: &S3Server, bucket: &str) -> Arc<dyn ObjectStore> {
    Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(server.endpoint())
            .with_allow_http(true)
            .with_region("eu-central-1")
            .with_bucket_name(bucket)
            .with_access_key_id(weir_testkit::DEFAULT_ACCESS_KEY)
            .with_secret_access_key(weir_testkit::DEFAULT_SECRET_KEY)
            .with_virtual_hosted_style_request(false)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .build()
            .unwrap(),
    )
}

/// Delta's commit protocol: of 8 concurrent create-if-absent writers exactly one wins,
/// round after round, and the stored object is the winner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_conditional_create_has_exactly_one_winner() {
    let (server, _dir) = s3_server().await;
    let store = client_for(&server, "race");
    for round in 0..20 {
        let path = object_store::path::Path::from(format!("_delta_log/{round:020}.json"));
        let mut tasks = Vec::new();
        for writer in 0..8 {
            let (store, path) = (store.clone(), path.clone());
            tasks.push(tokio::spawn(async move {
                let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
                (writer, store.put_opts(&path, PutPayload::from(format!("writer {writer}")), opts).await)
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            let (writer, r) = t.await.unwrap();
            match r {
                Ok(_) => winners.push(writer),
                Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {}
                Err(e) => panic!("round {round}: unexpected error {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let body = store.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(body.as_ref(), format!("writer {}", winners[0]).as_bytes(), "round {round}");
    }
}

/// Wrong credentials are refused (SigV4 is really checked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_refuses_wrong_credentials() {
    let (server, _dir) = s3_server().await;
    let store = AmazonS3Builder::new()
        .with_endpoint(server.endpoint())
        .with_allow_http(true)
        .with_region("eu-central-1")
        .with_bucket_name("race")
        .with_access_key_id(weir_testkit::DEFAULT_ACCESS_KEY)
        .with_secret_access_key("wrong-secret")
        .with_virtual_hosted_style_request(false)
        .build()
        .unwrap();
    let err = store.put(&"x".into(), PutPayload::from("y")).await.unwrap_err();
    assert!(err.to_string().contains("SignatureDoesNotMatch") || err.to_string().contains("403"), "{err}");
}

/// `weir doctor`'s checks pass on both lake kinds: object store, one-winner commits, a Delta
/// table read back through DataFusion, a Lance dataset read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lake_checks_pass_on_local_and_s3() {
    let (server, _dir) = s3_server().await;
    let local_dir = tempfile::tempdir().unwrap();
    let s3 = S3Settings {
        endpoint: Some(server.endpoint()),
        region: Some("eu-central-1".into()),
        access_key_id: Some(weir_testkit::DEFAULT_ACCESS_KEY.into()),
        secret_access_key: Some(weir_testkit::DEFAULT_SECRET_KEY.into()),
        session_token: None,
        allow_http: None,
    };
    for loc in [
        LakeLocation::Local { root: local_dir.path().join("lake") },
        LakeLocation::S3 { bucket: "lake".into(), prefix: "weir/test".into() },
    ] {
        let lake = Lake::open(loc.clone(), &s3, false).unwrap();
        let checks = weir_lake::run_checks(&lake).await;
        assert_eq!(checks.len(), 4, "{checks:?}");
        for c in &checks {
            assert!(c.ok, "{:?}: {} failed: {}", loc, c.name, c.detail);
        }
        // The checks clean up after themselves.
        let left: Vec<_> =
            futures::StreamExt::collect::<Vec<_>>(lake.store().list(Some(&lake.path("_weir/doctor")))).await;
        assert!(left.is_empty(), "{loc:?}: left behind {left:?}");
    }
    // A non-EU region is refused before anything is written, naming the flag.
    let us = S3Settings { region: Some("us-east-1".into()), ..s3.clone() };
    let err = Lake::open(LakeLocation::S3 { bucket: "lake".into(), prefix: String::new() }, &us, false).unwrap_err();
    assert!(err.to_string().contains("us-east-1") && err.to_string().contains("--allow-non-eu"), "{err}");
}

/// Without a configured region, an S3 lake's region is the one the bucket reports
/// (GetBucketLocation, SigV4-signed): an EU bucket opens, a non-EU one is refused naming the
/// region and the flag, through the library and through `weir doctor`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_comes_from_the_bucket() {
    for (region, eu) in [("eu-north-1", true), ("us-west-2", false)] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = S3ServerConfig::local(dir.path());
        cfg.buckets = vec!["lake".into()];
        cfg.region = region.into();
        let server = S3Server::start(cfg).await.unwrap();
        let s3 = S3Settings {
            endpoint: Some(server.endpoint()),
            region: None,
            access_key_id: Some(weir_testkit::DEFAULT_ACCESS_KEY.into()),
            secret_access_key: Some(weir_testkit::DEFAULT_SECRET_KEY.into()),
            session_token: None,
            allow_http: Some(true),
        };
        assert_eq!(weir_lake::store::bucket_region("lake", &s3).await.unwrap(), region);
        let loc = LakeLocation::S3 { bucket: "lake".into(), prefix: "w".into() };
        let opened = Lake::open_resolving(loc.clone(), &s3, false).await;
        let out = std::process::Command::new(crate::common::weir_bin())
            .args(["doctor", "--lake", "s3://lake/w"])
            .env("AWS_ENDPOINT_URL", server.endpoint())
            .env("AWS_ACCESS_KEY_ID", weir_testkit::DEFAULT_ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", weir_testkit::DEFAULT_SECRET_KEY)
            .env("AWS_ALLOW_HTTP", "true")
            .env_remove("AWS_REGION")
            .env_remove("AWS_DEFAULT_REGION")
            .env_remove("WEIR_LAKE")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if eu {
            assert!(opened.is_ok(), "{:?}", opened.err());
            assert!(out.status.success(), "{stderr}");
        } else {
            let err = opened.unwrap_err().to_string();
            assert!(err.contains(region) && err.contains("--allow-non-eu"), "{err}");
            assert!(!out.status.success());
            assert!(stderr.contains(region) && stderr.contains("--allow-non-eu"), "{stderr}");
            assert!(Lake::open_resolving(loc, &s3, true).await.is_ok());
        }
        // A wrong secret: the question itself is refused, and the error says what to set.
        let bad = S3Settings { secret_access_key: Some("wrong".into()), ..s3.clone() };
        let err = weir_lake::store::bucket_region("lake", &bad).await.unwrap_err().to_string();
        assert!(err.contains("\"lake\"") && err.contains("AWS_REGION") && err.contains("403"), "{err}");
    }
}
