//! The `weir` binary: bad input gives one line naming the problem and a non-zero exit;
//! the happy path of generate + legacy build through the real command line.

use std::process::{Command, Output};

use crate::common;

fn weir(args: &[&str]) -> Output {
    weir_env(args, &[])
}

fn weir_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(common::weir_bin())
        .args(args)
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env_remove("WEIR_PG_URL")
        .env_remove("WEIR_LAKE")
        .env_remove("WEIR_CONFIG")
        .envs(env.iter().copied())
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run weir")
}

/// Non-zero exit, exactly one line on stderr, containing every `needle`.
fn fails_with(args: &[&str], needles: &[&str]) {
    fails_with_env(args, &[], needles)
}

fn fails_with_env(args: &[&str], env: &[(&str, &str)], needles: &[&str]) {
    let out = weir_env(args, env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "weir {args:?} should fail; stdout: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(stderr.trim_end().lines().count(), 1, "weir {args:?}: one line expected, got:\n{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "weir {args:?}: {n:?} not in {stderr:?}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn help_lists_every_subcommand() {
    let out = weir(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in ["demo", "generate", "backfill", "legacy", "doctor", "services", "s3-server"] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(sub))
            .unwrap_or_else(|| panic!("{sub} missing from:\n{text}"));
        assert!(line.trim_start().len() > sub.len() + 10, "{sub} has no description: {line:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_one_line_and_non_zero() {
    let (_pg, url) = common::marketplace(0.01, 5).await;
    // A closed port: bind, note, release.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let unreachable = format!("postgres://postgres@127.0.0.1:{closed}/x");
    fails_with(&["generate", "--pg", "not a url", "--scale", "0.01"], &["invalid PostgreSQL URL"]);
    fails_with(
        &["generate", "--pg", &unreachable, "--scale", "0.01"],
        &["cannot connect to PostgreSQL", &format!("127.0.0.1:{closed}")],
    );
    fails_with(&["generate", "--pg", &url, "--scale", "-1"], &["invalid scale -1"]);
    fails_with(&["generate", "--pg", &url, "--scale", "lots"], &["invalid scale \"lots\""]);
    fails_with(&["generate", "--pg", &url, "--scale", "0"], &["invalid scale 0"]);
    fails_with(&["generate", "--scale", "0.01"], &["no PostgreSQL URL", "--pg"]);
    fails_with(
        &["legacy", "build", "--pg", &url, "--make", "trabant", "--as-of", "2026-07-01"],
        &["unknown make slug \"trabant\"", "vw"],
    );
    fails_with(
        &["legacy", "build", "--pg", &url, "--make", "VW;drop", "--as-of", "2026-07-01"],
        &["invalid make slug"],
    );
    fails_with(
        &["legacy", "build", "--pg", &url, "--make", "vw", "--as-of", "last tuesday"],
        &["cannot parse timestamp \"last tuesday\""],
    );
    fails_with(&["legacy", "build", "--pg", &url, "--as-of", "2026-07-01"], &["--make"]);
    fails_with(&["generate", "day", "--pg", &url, "--date", "2026-02-30"], &["cannot parse date \"2026-02-30\""]);
    fails_with(&["generate", "day", "--pg", &url, "--date", "2025-01-01"], &["not after the latest day"]);
    fails_with(&["doctor", "--lake", "gs://bucket/x"], &["unsupported scheme \"gs\""]);
    fails_with(&["doctor", "--lake", "s3://weir-lake/x"], &["region", "weir-lake"]);
    fails_with(&["--config", "/nonexistent/weir.toml", "doctor"], &["cannot read config /nonexistent/weir.toml"]);
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("weir.toml");
    std::fs::write(&bad, "pg_url = [").unwrap();
    fails_with(&["--config", bad.to_str().unwrap(), "doctor"], &["malformed config", "weir.toml"]);
    fails_with(&["no-such-command"], &["no-such-command"]);
    // backfill
    let lake = format!("file://{}", dir.path().join("lake").display());
    fails_with(
        &["backfill", "--pg", &url, "--lake", &lake, "--tables", "listings,nope"],
        &["unknown table \"nope\"", "price_log"],
    );
    fails_with_env(
        &["backfill", "--pg", &url, "--lake", "s3://weir-lake/x"],
        &[("AWS_REGION", "us-east-1")],
        &["\"weir-lake\"", "us-east-1", "outside the EU", "--allow-non-eu"],
    );
    fails_with(&["backfill", "--pg", &url, "--lake", "ftp://x/y"], &["unsupported scheme \"ftp\""]);
    fails_with(
        &["backfill", "--pg", &url, "--lake", &lake, "--sources", bad.to_str().unwrap()],
        &["malformed sources file", "weir.toml"],
    );
    fails_with(&["backfill", "--pg", &unreachable, "--lake", &lake], &["cannot connect to PostgreSQL"]);
    // parity: a slug the source does not have, and a make whose legacy mart was never built
    fails_with(
        &["parity", "--pg", &url, "--lake", &lake, "--make", "trabant"],
        &["unknown make slug \"trabant\"", "vw"],
    );
    fails_with(
        &["parity", "--pg", &url, "--lake", &lake, "--make", "vw"],
        &["legacy table ads_vw does not exist", "weir legacy build --make vw"],
    );
    assert!(!dir.path().join("lake").join("bronze").exists(), "nothing may be written on bad input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_and_legacy_build_through_the_binary() {
    let pg = tokio::task::spawn_blocking(weir_testkit::PgCluster::start).await.unwrap().unwrap();
    let url = pg.create_database("cli").unwrap();
    let out = weir(&["generate", "--pg", &url, "--scale", "0.01", "--seed", "11"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("price_log") && text.contains("/s"), "{text}");
    let out = weir(&["legacy", "build", "--pg", &url, "--all-makes", "--as-of", "2026-07-01T00:00:00Z"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c = common::client(&url).await;
    let marts = common::scalar_i64(
        &c,
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 'ads\\_%'",
    )
    .await;
    let makes = common::scalar_i64(&c, "SELECT count(*) FROM makes").await;
    assert_eq!(marts, makes);
    let mut total = 0;
    for r in c
        .query("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 'ads\\_%'", &[])
        .await
        .unwrap()
    {
        let t: String = r.get(0);
        total += common::scalar_i64(&c, &format!("SELECT count(*) FROM \"{t}\"")).await;
    }
    assert_eq!(
        total,
        common::scalar_i64(&c, "SELECT count(*) FROM listings").await,
        "every listing in exactly one mart"
    );
    let out = weir(&["generate", "day", "--pg", &url, "--date", "2026-07-01", "--seed", "1", "--taxonomy-rate", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("taxonomy change"));
}
