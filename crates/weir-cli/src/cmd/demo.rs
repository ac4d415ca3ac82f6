//! `weir demo`: the whole chain on embedded defaults. Today: local services, the generated
//! marketplace, lake checks on both lake kinds, the backfill, the legacy mart, the derived
//! mart and the parity verdict, a day through CDC, Flight SQL and the FDW, and the ML layer
//! (feature versions, vectors, similar listings, the price rating).

use std::time::Instant;

use anyhow::{Context, Result};
use chrono::DateTime;
use weir_core::{LakeLocation, S3Settings};
use weir_lake::Lake;
use weir_testkit::{PgCluster, S3Server, S3ServerConfig};

use super::{secs, step, thousands};
use crate::cli::DemoArgs;
use crate::settings;

const BUCKET: &str = "weir-demo";

pub async fn run(a: DemoArgs) -> Result<()> {
    let scale = settings::parse_scale(&a.scale)?;
    weir_core::validate_slug(&a.make)?;
    let cwd = std::env::current_dir()?;
    let local = LakeLocation::parse(&a.lake, &cwd)?;
    let started = Instant::now();
    println!(
        "weir demo: a throwaway PostgreSQL 15, the in-repo S3 server, a generated marketplace (SF {scale}), a Delta backfill, the legacy mart for {} and its DataFusion rewrite, compared\n",
        a.make
    );

    let pg = step(
        "starting PostgreSQL 15 (initdb + pg_ctl, wal_level=logical)",
        async { Ok(tokio::task::spawn_blocking(PgCluster::start).await??) },
        |pg: &PgCluster| format!("listening on 127.0.0.1:{} (data {})", pg.port(), pg.data_dir().display()),
    )
    .await?;
    let db_url = pg.create_database("marketplace")?;

    let s3_dir = tempfile::Builder::new().prefix("weir-s3-").tempdir().context("creating the S3 server's folder")?;
    let s3 = step(
        "starting the S3 server (s3s-fs with per-key locks)",
        async {
            let mut cfg = S3ServerConfig::local(s3_dir.path());
            cfg.buckets = vec![BUCKET.to_string()];
            Ok(S3Server::start(cfg).await?)
        },
        |s: &S3Server| format!("{} region {}", s.endpoint(), s.config().region),
    )
    .await?;

    let s3_settings = S3Settings {
        endpoint: Some(s3.endpoint()),
        region: Some(s3.config().region.clone()),
        access_key_id: Some(s3.config().access_key.clone()),
        secret_access_key: Some(s3.config().secret_key.clone()),
        session_token: None,
        allow_http: Some(true),
    };
    for (name, loc) in
        [("local lake", local.clone()), ("S3 lake", LakeLocation::S3 { bucket: BUCKET.into(), prefix: "lake".into() })]
    {
        println!("▸ checking the {name} {}", loc.url());
        let t = Instant::now();
        let lake = Lake::open(loc, &s3_settings, false)?;
        if !super::doctor::report(&lake).await {
            anyhow::bail!("the {name} failed its checks");
        }
        println!("  ✔ ready ({})", secs(t.elapsed()));
    }

    let t = Instant::now();
    println!("▸ generating the marketplace (SF {scale}, seed {}) with COPY BINARY", a.seed);
    let report = super::generate::generate(&db_url, scale, a.seed, false).await?;
    super::generate::print_report(&report, t.elapsed());

    println!("▸ backfilling into the local lake {} (one snapshot, 2 workers, Delta)", local.url());
    let lake = Lake::open(local.clone(), &s3_settings, false)?;
    let sources = super::backfill::load_sources(None)?;
    let opts = weir_ingest::BackfillOptions {
        force: true,
        slot: weir_ingest::SlotMode::Slot(weir_ingest::default_slot_name(lake.url().as_str())),
        ..weir_ingest::BackfillOptions::default()
    };
    let t = Instant::now();
    let reports = super::backfill::run_backfill(&db_url, &lake, &sources.tables, &opts, None).await?;
    super::backfill::print_reports(&reports);
    println!("  ✔ {} tables landed ({})", reports.len(), secs(t.elapsed()));

    let as_of = DateTime::from_timestamp_micros(weir_synth::HISTORY_END).expect("constant");
    let mart = step(
        &format!("building the legacy mart ads_{} as of {}", a.make, as_of.format("%Y-%m-%dT%H:%M:%SZ")),
        async {
            let mut c = weir_postgres::connect(&db_url).await?;
            Ok(weir_synth::build_legacy_mart(&mut c, &a.make, as_of).await?)
        },
        |r| format!("{}: {} rows", r.table, thousands(r.rows)),
    )
    .await?;

    let bronze = sources.names();
    let jobs = super::derive::load_jobs(None, &bronze)?;
    derive_and_compare(&db_url, &lake, &jobs, &bronze, &a.make, as_of.timestamp_micros()).await?;

    // A day of change, through logical replication, and parity again.
    let date = (as_of + chrono::Duration::days(1)).date_naive();
    step(
        &format!("a day of change in PostgreSQL ({date}: new, updated, deleted listings, prices, fx, taxonomy)"),
        async {
            let opts = weir_synth::DayOptions { date, seed: 7, taxonomy_rate: 1.0 };
            Ok(weir_synth::apply_day(&db_url, &opts).await?)
        },
        |r| {
            format!(
                "{} new listings, {} updated, {} price rows, {} taxonomy change(s)",
                r.new_listings,
                r.updated,
                r.price_rows,
                r.taxonomy_changes.len()
            )
        },
    )
    .await?;
    println!("▸ applying it to the lake through CDC (weir sync: the backfill's slot, Delta MERGE, exactly once)");
    let t = Instant::now();
    let opts = weir_ingest::SyncOptions::new(weir_ingest::default_slot_name(lake.url().as_str()));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let report = weir_ingest::sync(&db_url, &lake, &sources.tables, &opts, &stop, super::sync::print_batch).await?;
    println!(
        "  ✔ {} transaction(s), {} changes applied; slot confirmed at {} ({})",
        report.transactions,
        thousands(report.changes),
        report.lsn,
        secs(t.elapsed())
    );
    step(
        &format!("rebuilding the legacy mart ads_{} in PostgreSQL", a.make),
        async {
            let mut c = weir_postgres::connect(&db_url).await?;
            Ok(weir_synth::build_legacy_mart(&mut c, &a.make, as_of).await?)
        },
        |r| format!("{}: {} rows", r.table, thousands(r.rows)),
    )
    .await?;
    derive_and_compare(&db_url, &lake, &jobs, &bronze, &a.make, as_of.timestamp_micros()).await?;
    let c = weir_postgres::connect(&db_url).await?;

    let ml_listing = ml_build(&lake, &bronze, &a.make).await?;
    let flight = start_flight(&lake, &jobs).await?;
    let (flight_rows, flight_sum) = step(
        "serving the lake over Arrow Flight SQL and reading ads_vw back with a Flight SQL client",
        query_flight(&flight, &mart.table),
        |(n, sum): &(i64, String)| {
            format!("{}: SELECT count(*), sum(price_last_eur) FROM {} → {n} rows, {sum}", flight.url, mart.table)
        },
    )
    .await?;
    fdw_demo(&db_url, &flight, &mart.table).await?;
    if let Some(id) = ml_listing {
        ml_show(&flight, id).await?;
    }
    flight.stop().await?;

    let row = c
        .query_one(
            &format!(
                "SELECT count(*), count(*) FILTER (WHERE is_active), coalesce(sum(price_last_eur), 0)::text,
                        count(*) FILTER (WHERE price_first_eur IS NULL), round(avg(days_online), 1)::text
                 FROM \"{}\"",
                mart.table
            ),
            &[],
        )
        .await
        .with_context(|| format!("reading {}", mart.table))?;
    let (n, active, sum, no_price, days): (i64, i64, String, i64, Option<String>) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    println!(
        "\n{}: {} listings, {} active, sum(price_last_eur) = {sum} EUR, {} without a EUR first price, avg days online {}",
        mart.table,
        thousands(n as u64),
        thousands(active as u64),
        thousands(no_price as u64),
        days.unwrap_or_default()
    );
    if flight_rows != n || flight_sum != sum {
        anyhow::bail!("Flight SQL returned {flight_rows} rows / {flight_sum}, PostgreSQL {n} / {sum}");
    }
    println!("over Flight SQL: the same {} rows and sum", thousands(flight_rows as u64));
    println!("done in {}", secs(started.elapsed()));

    if a.keep {
        let data = pg.keep();
        let s3_root = s3_dir.keep();
        s3.stop().await;
        let child = std::process::Command::new(std::env::current_exe()?)
            .arg("s3-server")
            .arg(&s3_root)
            .args(["--addr", "127.0.0.1:0", "--bucket", BUCKET])
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(s3_root.join("server.log"))?)
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting a detached S3 server")?;
        // Its port: read back from its log line.
        let mut endpoint = String::from("(see its log)");
        for _ in 0..50 {
            let log = std::fs::read_to_string(s3_root.join("server.log")).unwrap_or_default();
            if let Some(url) = log.split_whitespace().find(|w| w.starts_with("http://")) {
                endpoint = url.to_string();
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        println!("\nservices left running (--keep):");
        println!("  psql {db_url}");
        println!(
            "  S3: {endpoint} bucket {BUCKET} (access key {}, region eu-central-1)",
            weir_testkit::DEFAULT_ACCESS_KEY
        );
        println!("stop them with:");
        println!(
            "  su postgres -c '{}/pg_ctl -D {} stop' (or without su when not root)",
            weir_testkit::find_pg_bindir(None).map(|p| p.display().to_string()).unwrap_or_default(),
            data.display()
        );
        println!("  kill {}", child.id());
    }
    Ok(())
}

/// The lake served in-process on a free port, with a throwaway user.
struct FlightDemo {
    url: String,
    password: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), weir_flight::ServeError>>,
}

impl FlightDemo {
    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        Ok(self.task.await??)
    }
}

async fn start_flight(lake: &Lake, jobs: &weir_derive::Jobs) -> Result<FlightDemo> {
    let password = uuid::Uuid::new_v4().simple().to_string();
    let settings = weir_core::ServeSettings {
        users: vec![weir_core::ServeUser { name: "demo".into(), password: password.clone() }],
        ..Default::default()
    };
    let auth = weir_flight::Auth::new(&settings)?;
    let opts = weir_flight::ServeOptions {
        addr: "127.0.0.1:0".into(),
        memory_limit_bytes: 512 << 20,
        refresh: std::time::Duration::from_secs(1),
        tls: None,
    };
    let catalog = weir_flight::Catalog::new(lake.clone(), jobs.clone(), opts.refresh, opts.memory_limit_bytes);
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        weir_flight::serve(
            catalog,
            auth,
            &opts,
            |a| {
                let _ = bound_tx.send(a);
            },
            async {
                let _ = stop_rx.await;
            },
        )
        .await
    });
    let addr = bound_rx.await.context("the Flight server did not start")?;
    Ok(FlightDemo { url: format!("grpc://{addr}"), password, stop, task })
}

/// One statement through a Flight SQL client (handshake, statement, DoGet).
async fn flight_sql(flight: &FlightDemo, sql: &str) -> Result<Vec<arrow::array::RecordBatch>> {
    use arrow_flight::sql::client::FlightSqlServiceClient;
    use futures::TryStreamExt;

    let endpoint = flight.url.replacen("grpc://", "http://", 1);
    let channel = tonic::transport::Endpoint::from_shared(endpoint)?.connect().await?;
    let mut client = FlightSqlServiceClient::new(channel);
    client.handshake("demo", &flight.password).await?;
    let info = client.execute(sql.to_string(), None).await?;
    let ticket = info.endpoint.first().and_then(|e| e.ticket.clone()).context("no ticket")?;
    Ok(client.do_get(ticket).await?.try_collect().await?)
}

/// count(*) and sum(price_last_eur) of a mart through a Flight SQL client.
async fn query_flight(flight: &FlightDemo, table: &str) -> Result<(i64, String)> {
    use arrow::array::{Array, AsArray};

    let batches =
        flight_sql(flight, &format!("SELECT count(*) AS n, CAST(sum(price_last_eur) AS VARCHAR) AS s FROM {table}"))
            .await?;
    let b = batches.first().context("no rows from Flight")?;
    let n = b.column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0);
    let s = arrow::compute::cast(b.column(1), &arrow::datatypes::DataType::Utf8)?;
    let s = s.as_string::<i32>();
    let sum = if s.is_null(0) { "0".to_string() } else { s.value(0).to_string() };
    Ok((n, sum))
}

/// The FDW step: install weir_fdw into the demo's PostgreSQL, replace the legacy mart with
/// the view over the lake, compare the two, and roll back. Skipped (with the reason) when
/// the extension is not installed in the system PostgreSQL.
async fn fdw_demo(db_url: &str, flight: &FlightDemo, table: &str) -> Result<()> {
    let c = weir_postgres::connect(db_url).await?;
    let available: bool =
        c.query_one("SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'weir_fdw')", &[]).await?.get(0);
    println!(
        "▸ weir fdw install: {table} in PostgreSQL becomes a view over the lake (the legacy table kept as {table}_legacy)"
    );
    if !available {
        println!(
            "  – skipped: the weir_fdw extension is not installed here (./infra/local/fdw.sh builds and installs it)"
        );
        return Ok(());
    }
    let t = Instant::now();
    let args = crate::cli::FdwInstallArgs {
        pg: crate::cli::PgArg { pg: Some(db_url.to_string()) },
        flight: flight.url.clone(),
        schema: "public".into(),
        user: Some("demo".into()),
        password: Some(flight.password.clone()),
        token: None,
        replace_legacy: true,
    };
    super::fdw::install(args, &weir_core::Config::default()).await?;
    let q = |rel: String| {
        let c = &c;
        async move {
            let r = c
                .query_one(&format!("SELECT count(*), coalesce(sum(price_last_eur), 0)::text FROM {rel}"), &[])
                .await
                .with_context(|| format!("reading {rel}"))?;
            Ok::<(i64, String), anyhow::Error>((r.get(0), r.get(1)))
        }
    };
    let legacy = q(format!("{table}_legacy")).await?;
    let view = q(table.to_string()).await?;
    println!(
        "  SELECT count(*), sum(price_last_eur) FROM {table}_legacy → {} rows, {}",
        thousands(legacy.0 as u64),
        legacy.1
    );
    println!(
        "  SELECT count(*), sum(price_last_eur) FROM {table} (weir_fdw) → {} rows, {}",
        thousands(view.0 as u64),
        view.1
    );
    let diff: i64 = c
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM (SELECT * FROM {table} EXCEPT ALL SELECT * FROM {table}_legacy) a)
                      + (SELECT count(*) FROM (SELECT * FROM {table}_legacy EXCEPT ALL SELECT * FROM {table}) b)"
            ),
            &[],
        )
        .await?
        .get(0);
    if legacy != view || diff != 0 {
        anyhow::bail!("the FDW view and the legacy table differ ({diff} rows in EXCEPT ALL)");
    }
    super::fdw::rollback(
        crate::cli::FdwRollbackArgs { pg: crate::cli::PgArg { pg: Some(db_url.to_string()) }, schema: "public".into() },
        &weir_core::Config::default(),
    )
    .await?;
    println!("  ✔ identical (EXCEPT ALL both ways is empty); rolled back to the legacy table ({})", secs(t.elapsed()));
    Ok(())
}

/// Derives the folded price log and every make's mart rows (whole tables: incremental after
/// CDC), then compares the make's mart with the legacy table; fails unless bit-identical.
async fn derive_and_compare(
    db_url: &str,
    lake: &Lake,
    jobs: &weir_derive::Jobs,
    bronze: &[String],
    make: &str,
    as_of_micros: i64,
) -> Result<()> {
    println!("▸ deriving the folded price log and every make's mart rows in the lake with DataFusion (tables/jobs)");
    let t = Instant::now();
    let opts = weir_derive::DeriveOptions {
        job: Some("ads".into()),
        makes: weir_derive::MakeSelection::All,
        as_of_micros,
        full: false,
        target_file_bytes: 128 << 20,
    };
    // The stored tables, and the one mart compared below (the others are views alike).
    let mart = format!("gold.ads_{make}");
    let reports: Vec<weir_derive::JobReport> = super::derive::run_derive(lake, jobs, bronze, &opts)
        .await?
        .into_iter()
        .filter(|r| !r.output.starts_with("gold.") || r.output == mart)
        .collect();
    super::derive::print_reports(&reports);
    println!("  ✔ derived ({})", secs(t.elapsed()));

    let c = weir_postgres::connect(db_url).await?;
    println!("▸ parity: gold.ads_{make} in the lake against the legacy ads_{make} in PostgreSQL");
    let t = Instant::now();
    let opts = weir_derive::ParityOptions {
        slug: make.to_string(),
        legacy_table: None,
        show: 5,
        expect_as_of: Some(as_of_micros),
    };
    let parity = weir_derive::parity(&c, lake, jobs, &opts).await?;
    for line in parity.render().lines() {
        println!("  {line}");
    }
    if !parity.identical() {
        anyhow::bail!("parity failed: {} and {} differ", parity.legacy_table, parity.lake_table);
    }
    println!(
        "  ✔ bit-identical: {} rows × {} columns ({})",
        thousands(parity.legacy_rows),
        parity.columns.len(),
        secs(t.elapsed())
    );
    Ok(())
}

/// The ML step: feature versions, the vector table and the price rating. Returns an active
/// listing of the make with a rating, to show.
async fn ml_build(lake: &Lake, bronze: &[String], make: &str) -> Result<Option<i64>> {
    println!(
        "▸ ML: feature versions (tables/features), the Lance vector table with its IVF_PQ index, the price rating"
    );
    let t = Instant::now();
    let jobs = super::features::load_feature_jobs(None, None, bronze)?;
    let as_of_micros = weir_derive::run::default_as_of(lake, bronze).await?.context("no bronze tables")?;
    let opts = weir_derive::DeriveOptions {
        job: None,
        makes: weir_derive::MakeSelection::All,
        as_of_micros,
        full: false,
        target_file_bytes: 128 << 20,
    };
    let run = super::features::build(lake, &jobs, bronze, &opts, &Default::default()).await?;
    for r in run.reports.iter().filter(|r| r.output.starts_with("gold.")) {
        if let weir_derive::JobOutcome::Built { rows, .. } = r.outcome {
            println!("  {}: {} versions", r.output, thousands(rows));
        }
    }
    super::features::print_vectors(&run.vectors);
    let ds = weir_ml::vectors::open(lake).await?.context("the vector table was just built")?;
    let mut scan = ds.scan();
    scan.filter(&format!("make = '{make}' AND is_active AND price_rating IS NOT NULL"))?
        .project(&["listing_id"])?
        .limit(Some(1), None)?;
    let batch = scan.try_into_batch().await?;
    println!("  ✔ {} listings embedded ({})", thousands(run.vectors.rows as u64), secs(t.elapsed()));
    Ok((batch.num_rows() > 0).then(|| {
        use arrow::array::AsArray;
        batch.column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0)
    }))
}

/// Five similar listings and the price rating of one listing, over Flight SQL.
async fn ml_show(flight: &FlightDemo, id: i64) -> Result<()> {
    println!("▸ similar listings and the price rating over Flight SQL: SELECT … FROM similar_listings({id}, 5)");
    let show = |b: &arrow::array::RecordBatch, i: usize, c: &str| {
        b.column_by_name(c).and_then(|a| arrow::util::display::array_value_to_string(a, i).ok()).unwrap_or_default()
    };
    let me = flight_sql(
        flight,
        &format!(
            "SELECT country, make, model, CAST(price_last_eur AS VARCHAR) AS price, neighbour_median_eur, price_rating,
                    price_rating_label FROM vectors.listings WHERE listing_id = {id}"
        ),
    )
    .await?;
    let b = me.iter().find(|b| b.num_rows() > 0).context("the listing is not served")?;
    println!(
        "  listing {id} ({} {} {}): {} EUR; its 10 nearest active neighbours' median {:.2} EUR → {:.2} ({})",
        show(b, 0, "country"),
        show(b, 0, "make"),
        show(b, 0, "model"),
        show(b, 0, "price"),
        show(b, 0, "neighbour_median_eur").parse::<f64>().unwrap_or(f64::NAN),
        show(b, 0, "price_rating").parse::<f64>().unwrap_or(f64::NAN),
        show(b, 0, "price_rating_label"),
    );
    let near = flight_sql(
        flight,
        &format!(
            "SELECT listing_id, distance, country, make, model, CAST(price_last_eur AS VARCHAR) AS price
             FROM similar_listings({id}, 5)"
        ),
    )
    .await?;
    let mut shown = 0;
    for b in &near {
        for i in 0..b.num_rows() {
            shown += 1;
            println!(
                "    #{} distance {:.3}: {} {} {}, {} EUR",
                show(b, i, "listing_id"),
                show(b, i, "distance").parse::<f64>().unwrap_or(f64::NAN),
                show(b, i, "country"),
                show(b, i, "make"),
                show(b, i, "model"),
                show(b, i, "price")
            );
        }
    }
    anyhow::ensure!(shown == 5, "similar_listings returned {shown} rows, not 5");
    println!("  ✔ served by weir serve: similar_listings(id, k), features_at(id, ts), vectors.listings");
    Ok(())
}
