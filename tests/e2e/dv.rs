//! Deletion vectors (`weir_lake::dv`): a merge into a table of large files marks the rows it
//! replaces instead of copying the files, and every way of reading the table (a full scan, a
//! range filter, a join, a top-k; Python's `deltalake`) sees exactly the rows a model of the
//! table holds. The file has row groups of 10,000 rows and pages of 1,000, so a filter that
//! reached its Parquet scan would skip parts of it; delta-rs 0.32 then applied the deletion
//! vector to the wrong rows (`weir_lake::dvscan`).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use deltalake::kernel::transaction::CommitProperties;
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use weir_core::{LakeLocation, S3Settings};
use weir_lake::{KEEP_PREFIX, Lake, OP_COLUMN};

const REL: &str = "bronze/dv_probe";
const ROWS: i64 = 200_000;

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("v", DataType::Int64, true),
        Field::new("s", DataType::Utf8, true),
    ]))
}

fn props() -> WriterProperties {
    WriterProperties::builder().set_max_row_group_row_count(Some(10_000)).set_data_page_row_count_limit(1_000).build()
}

/// A merge source: upserts (`k`, `v`, `s`, `s` kept from the table when `keep_s`), deletes.
fn source(upserts: &[(i64, i64, bool)], deletes: &[i64]) -> RecordBatch {
    let ks: Vec<i64> = upserts.iter().map(|u| u.0).chain(deletes.iter().copied()).collect();
    let vs: Vec<Option<i64>> = upserts.iter().map(|u| Some(u.1)).chain(deletes.iter().map(|_| None)).collect();
    let ss: Vec<Option<String>> =
        upserts.iter().map(|u| Some(format!("new{}", u.0))).chain(deletes.iter().map(|_| None)).collect();
    let ops: Vec<&str> = upserts.iter().map(|_| "U").chain(deletes.iter().map(|_| "D")).collect();
    let keep: Vec<bool> = upserts.iter().map(|u| u.2).chain(deletes.iter().map(|_| false)).collect();
    let schema = Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("v", DataType::Int64, true),
        Field::new("s", DataType::Utf8, true),
        Field::new(OP_COLUMN, DataType::Utf8, false),
        Field::new(format!("{KEEP_PREFIX}s"), DataType::Boolean, false),
    ]);
    RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(Int64Array::from(ks)),
            Arc::new(Int64Array::from(vs)),
            Arc::new(StringArray::from(ss)),
            Arc::new(StringArray::from(ops)),
            Arc::new(arrow::array::BooleanArray::from(keep)),
        ],
    )
    .unwrap()
}

/// Applies a source to the model as the merge must.
fn apply(model: &mut BTreeMap<i64, (i64, String)>, upserts: &[(i64, i64, bool)], deletes: &[i64]) {
    for &(k, v, keep) in upserts {
        let s = match (keep, model.get(&k)) {
            (true, Some((_, s))) => s.clone(),
            (true, None) => String::new(),
            (false, _) => format!("new{k}"),
        };
        model.insert(k, (v, s));
    }
    for k in deletes {
        model.remove(k);
    }
}

async fn query(lake: &Lake, sql: &str) -> Vec<Vec<Option<i64>>> {
    query_table(lake, REL, sql).await
}

/// The text of `sql`'s plan (an EXPLAIN) over the table at `rel`, as `t`.
async fn explain_table(lake: &Lake, rel: &str, sql: &str) -> String {
    let ctx = weir_derive::session::session_context().unwrap();
    let table = weir_lake::open_table(lake, rel).await.unwrap();
    ctx.register_table("t", weir_derive::session::provider(&ctx, &table, rel).await.unwrap()).unwrap();
    let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    let mut text = String::new();
    for b in &batches {
        for c in b.columns() {
            let c = arrow::compute::cast(c, &DataType::Utf8).unwrap();
            text.extend(c.as_any().downcast_ref::<StringArray>().unwrap().iter().flatten().map(|l| format!("{l}\n")));
        }
    }
    text
}

async fn query_table(lake: &Lake, rel: &str, sql: &str) -> Vec<Vec<Option<i64>>> {
    let ctx = weir_derive::session::session_context().unwrap();
    let table = weir_lake::open_table(lake, rel).await.unwrap();
    ctx.register_table("t", weir_derive::session::provider(&ctx, &table, rel).await.unwrap()).unwrap();
    let keys: Vec<i64> = (0..300).map(|i| i * 661 + 7).collect();
    let keys = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)])),
        vec![Arc::new(Int64Array::from(keys))],
    )
    .unwrap();
    ctx.register_batch("keys", keys).unwrap();
    let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    let mut out = Vec::new();
    for b in batches {
        for r in 0..b.num_rows() {
            out.push(
                (0..b.num_columns())
                    .map(|c| {
                        let a = arrow::compute::cast(b.column(c), &DataType::Int64).unwrap();
                        let a = a.as_any().downcast_ref::<Int64Array>().unwrap();
                        a.is_valid(r).then(|| a.value(r))
                    })
                    .collect(),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merges_mark_rows_and_every_read_sees_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(LakeLocation::Local { root: dir.path().to_path_buf() }, &S3Settings::default(), false)
        .unwrap()
        .with_small_file_rows(0);
    let mut model: BTreeMap<i64, (i64, String)> = (0..ROWS).map(|k| (k, (k * 10, format!("r{k}")))).collect();
    let batch = RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(Int64Array::from_iter_values(0..ROWS)),
            Arc::new(Int64Array::from_iter_values((0..ROWS).map(|k| k * 10))),
            Arc::new(StringArray::from_iter_values((0..ROWS).map(|k| format!("r{k}")))),
        ],
    )
    .unwrap();
    let table = weir_lake::open_table(&lake, REL).await.unwrap();
    let mut w = RecordBatchWriter::try_new(lake.table_url(REL).as_str(), schema(), None, None)
        .unwrap()
        .with_writer_properties(props());
    w.write(batch).await.unwrap();
    let adds = w.flush().await.unwrap();
    assert_eq!(adds.len(), 1);
    weir_lake::commit_files(table, REL, &schema(), &[], adds, Default::default(), None, None, None).await.unwrap();
    assert!(!weir_lake::dv::has_deletion_vectors(&weir_lake::open_table(&lake, REL).await.unwrap()));

    // Two merges: updates (some keeping `s`), deletes, inserts; the second replaces rows the
    // first already marked, so its deletion vector holds the first one's rows too.
    let mut touched = std::collections::HashSet::new();
    let rounds: [(i64, i64, i64); 2] = [(7, 3, 11), (13, 1, 17)];
    for (round, (um, ur, dm)) in rounds.into_iter().enumerate() {
        let deletes: Vec<i64> = (0..ROWS).filter(|k| k % dm == 5).collect();
        let mut upserts: Vec<(i64, i64, bool)> =
            (0..ROWS).filter(|k| k % um == ur && k % dm != 5).map(|k| (k, -k - round as i64, k % 2 == 0)).collect();
        upserts.extend((0..500).map(|i| (ROWS + 1000 * round as i64 + i, i, false)));
        let table = weir_lake::open_table(&lake, REL).await.unwrap();
        let (_, stats) = weir_lake::merge_by_key(
            &lake,
            table,
            REL,
            source(&upserts, &deletes),
            &["k".to_string()],
            props(),
            CommitProperties::default(),
            weir_lake::MergeLayout::default(),
            None,
        )
        .await
        .unwrap();
        let existing = deletes.iter().filter(|k| model.contains_key(k)).count() as u64;
        let new = upserts.iter().filter(|u| !model.contains_key(&u.0)).count() as u64;
        assert_eq!(stats.deleted, existing, "round {round}: deletes of keys the table holds");
        assert_eq!((stats.inserted, stats.updated), (new, upserts.len() as u64 - new), "round {round}");
        apply(&mut model, &upserts, &deletes);
        touched.extend(upserts.iter().map(|u| u.0).chain(deletes.iter().copied()));
    }

    // The big file stays, with a deletion vector of the rows both merges replaced.
    let adds = crate::common::active_files(&lake, REL).await;
    let big: Vec<_> = adds.iter().filter(|a| a.get_stats().unwrap().unwrap().num_records == ROWS).collect();
    assert_eq!(big.len(), 1, "the first file stays, not rewritten: {adds:?}");
    let gone = (0..ROWS).filter(|k| touched.contains(k)).count() as i64;
    let dv = big[0].deletion_vector.as_ref().expect("the first file has a deletion vector");
    assert_eq!(dv.cardinality, gone, "every row either merge replaced or deleted is marked, and no other");

    let sum = |keep: &dyn Fn(i64) -> bool| -> Vec<Vec<Option<i64>>> {
        let rows: Vec<_> = model.iter().filter(|(k, _)| keep(**k)).collect();
        let s: i64 = rows.iter().map(|(_, (v, _))| *v).sum();
        vec![vec![Some(rows.len() as i64), (!rows.is_empty()).then_some(s)]]
    };
    assert_eq!(query(&lake, "SELECT count(*), sum(v) FROM t").await, sum(&|_| true), "full scan");
    assert_eq!(
        query(&lake, "SELECT count(*), sum(v) FROM t WHERE k BETWEEN 50000 AND 60999").await,
        sum(&|k| (50_000..=60_999).contains(&k)),
        "a range filter (row groups and pages of the file skipped if it reached the scan)"
    );
    let keys: std::collections::HashSet<i64> = (0..300).map(|i| i * 661 + 7).collect();
    assert_eq!(
        query(&lake, "SELECT count(*), sum(t.v) FROM t JOIN keys ON keys.k = t.k").await,
        sum(&|k| keys.contains(&k)),
        "a join (its dynamic filter)"
    );
    let mut top: Vec<(i64, i64)> = model.iter().map(|(k, (v, _))| (*v, *k)).collect();
    top.sort_unstable_by(|a, b| b.cmp(a));
    let want: Vec<Vec<Option<i64>>> = top.iter().take(5).map(|(v, k)| vec![Some(*k), Some(*v)]).collect();
    assert_eq!(query(&lake, "SELECT k, v FROM t ORDER BY v DESC, k DESC LIMIT 5").await, want, "a top-k");
    let kept_s = query(&lake, "SELECT count(*) FROM t WHERE s LIKE 'r%' AND v < 0").await;
    let want_s = model.values().filter(|(v, s)| s.starts_with('r') && *v < 0).count() as i64;
    assert_eq!(kept_s, vec![vec![Some(want_s)]], "updates that keep `s` keep the table's value");

    // Another reader: Python's deltalake applies the same deletion vectors.
    let uri = lake.table_url(REL).as_str().trim_end_matches('/').to_string();
    let read = crate::interop::python_reads(std::slice::from_ref(&uri), None);
    assert_eq!(read[&uri]["rows"].as_i64(), Some(model.len() as i64), "Python's deltalake");
}

/// A merge source carrying every column and no keep flag: upserts (`k`, `v`, and whether the
/// key is new to the table: an `I` row, not looked up), deletes.
fn whole_rows(upserts: &[(i64, i64, bool)], deletes: &[i64]) -> RecordBatch {
    let ks: Vec<i64> = upserts.iter().map(|u| u.0).chain(deletes.iter().copied()).collect();
    let vs: Vec<Option<i64>> = upserts.iter().map(|u| Some(u.1)).chain(deletes.iter().map(|_| None)).collect();
    let ss: Vec<Option<String>> =
        upserts.iter().map(|u| Some(format!("new{}", u.0))).chain(deletes.iter().map(|_| None)).collect();
    let ops: Vec<&str> =
        upserts.iter().map(|u| if u.2 { "I" } else { "U" }).chain(deletes.iter().map(|_| "D")).collect();
    let mut fields = schema().fields().to_vec();
    fields.push(Arc::new(Field::new(OP_COLUMN, DataType::Utf8, false)));
    RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        vec![
            Arc::new(Int64Array::from(ks)),
            Arc::new(Int64Array::from(vs)),
            Arc::new(StringArray::from(ss)),
            Arc::new(StringArray::from(ops)),
        ],
    )
    .unwrap()
}

/// The key-ordered layout of the marts (`MergeLayout::key_files`, no change data): rounds of
/// updates, inserts between existing keys (as upserts, and as `I` rows that are not looked
/// up) and deletes (as `D` rows, and by a [`weir_lake::KeyScope`]) leave exactly the model's rows, every
/// file sorted by key and at most a file's size, one file per merge generation holding any
/// key in its range (what a lookup's file skipping reads), no change data; and the first
/// merge marks the rows it replaces instead of copying the files around them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_ordered_merges_stay_sorted_small_and_exact() {
    use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    const KEYED: &str = "silver/dv_keyed";
    const FILE_ROWS: usize = 1_000;
    const N: i64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    // The default small-file threshold: the layout lowers it to half a file.
    let lake =
        Lake::open(LakeLocation::Local { root: dir.path().to_path_buf() }, &S3Settings::default(), false).unwrap();
    // As a full build writes it: even keys in key order, files of FILE_ROWS rows.
    let mut model: BTreeMap<i64, (i64, String)> = (0..N).map(|i| (2 * i, (i, format!("r{i}")))).collect();
    let table = weir_lake::open_table(&lake, KEYED).await.unwrap();
    let mut w = RecordBatchWriter::try_new(lake.table_url(KEYED).as_str(), schema(), None, None)
        .unwrap()
        .with_writer_properties(props());
    let mut adds = Vec::new();
    let rows: Vec<(i64, (i64, String))> = model.iter().map(|(k, v)| (*k, v.clone())).collect();
    for chunk in rows.chunks(FILE_ROWS) {
        let b = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from_iter_values(chunk.iter().map(|r| r.0))),
                Arc::new(Int64Array::from_iter_values(chunk.iter().map(|r| r.1.0))),
                Arc::new(StringArray::from_iter_values(chunk.iter().map(|r| r.1.1.clone()))),
            ],
        )
        .unwrap();
        w.write(b).await.unwrap();
        adds.extend(w.flush().await.unwrap());
    }
    let originals: std::collections::BTreeSet<String> = adds.iter().map(|a| a.path.clone()).collect();
    assert_eq!(originals.len(), N as usize / FILE_ROWS);
    weir_lake::commit_files(table, KEYED, &schema(), &[], adds, Default::default(), None, None, None).await.unwrap();
    let layout = weir_lake::MergeLayout { key_files: Some(FILE_ROWS), no_change_data: true };

    for round in 0..4i64 {
        let upserts: Vec<(i64, i64, bool)> = model
            .keys()
            .filter(|k| (*k / 2) % 7 == round)
            .map(|k| (*k, -k, false))
            .chain((0..N).filter(|i| i % 11 == round).map(|i| (2 * i + 1, round, i % 2 == 0)))
            .collect();
        let upserted: std::collections::HashSet<i64> = upserts.iter().map(|u| u.0).collect();
        let mut deletes: Vec<i64> =
            model.keys().filter(|k| (*k / 2) % 13 == round + 1 && !upserted.contains(k)).copied().collect();
        deletes.push(10_000_000 + round); // a key the table does not hold: nothing to delete
        let new = upserts.iter().filter(|u| !model.contains_key(&u.0)).count() as u64;
        let held = deletes.iter().filter(|k| model.contains_key(k)).count() as u64;
        let table = weir_lake::open_table(&lake, KEYED).await.unwrap();
        // Odd rounds delete as a derive does: the source holds the upserts alone, and its key
        // scope (the upserted keys too) deletes the table's rows of the other keys.
        let scope = (round % 2 == 1).then(|| weir_lake::KeyScope::new(upserted.iter().chain(&deletes).copied()));
        let source = match scope {
            Some(_) => whole_rows(&upserts, &[]),
            None => whole_rows(&upserts, &deletes),
        };
        let (_, stats) = weir_lake::merge_by_key(
            &lake,
            table,
            KEYED,
            source,
            &["k".to_string()],
            props(),
            CommitProperties::default(),
            layout,
            scope.as_ref(),
        )
        .await
        .unwrap();
        assert_eq!(
            (stats.inserted, stats.updated, stats.deleted),
            (new, upserts.len() as u64 - new, held),
            "round {round}"
        );
        for (k, v, _) in &upserts {
            model.insert(*k, (*v, format!("new{k}")));
        }
        for k in &deletes {
            model.remove(k);
        }

        let sum: i64 = model.values().map(|(v, _)| *v).sum();
        let strings = model.values().filter(|(_, s)| s.starts_with("new")).count() as i64;
        assert_eq!(
            query_table(&lake, KEYED, "SELECT count(*), sum(v), count(DISTINCT k) FROM t").await,
            vec![vec![Some(model.len() as i64), Some(sum), Some(model.len() as i64)]],
            "round {round}: every row once, with its newest values"
        );
        assert_eq!(
            query_table(&lake, KEYED, "SELECT count(*) FROM t WHERE s LIKE 'new%'").await,
            vec![vec![Some(strings)]],
            "round {round}"
        );
        let probe = *model.keys().nth(model.len() / 3).unwrap();
        assert_eq!(
            query_table(&lake, KEYED, &format!("SELECT v FROM t WHERE k = {probe}")).await,
            vec![vec![Some(model[&probe].0)]],
            "round {round}: a lookup"
        );

        // A join with few keys: its dynamic filter (their range) skips whole files, those with
        // deletion vectors among them, and the rows stay exact.
        let few: Vec<i64> = model.keys().skip(model.len() / 2).step_by(37).take(8).copied().collect();
        let few_sql = |what: &str| {
            let list: Vec<String> = few.iter().map(|k| format!("({k})")).collect();
            format!("{what} SELECT count(*), sum(t.v) FROM t JOIN (VALUES {}) AS n(k) ON n.k = t.k", list.join(", "))
        };
        assert_eq!(
            query_table(&lake, KEYED, &few_sql("")).await,
            vec![vec![Some(few.len() as i64), Some(few.iter().map(|k| model[k].0).sum())]],
            "round {round}: a join with few keys"
        );
        let plan = explain_table(&lake, KEYED, &few_sql("EXPLAIN ANALYZE")).await;
        let skipped: usize = plan
            .split("files_skipped=")
            .skip(1)
            .map(|rest| rest.chars().take_while(char::is_ascii_digit).collect::<String>().parse::<usize>().unwrap())
            .sum();
        assert!(skipped > 0, "round {round}: the join's key range skipped no file:\n{plan}");

        let active = crate::common::active_files(&lake, KEYED).await;
        let mut ranges = Vec::new();
        for a in &active {
            let file = std::fs::File::open(dir.path().join(KEYED).join(&a.path)).unwrap();
            let mut keys: Vec<i64> = Vec::new();
            for b in ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap() {
                let b = b.unwrap();
                let c = b.column_by_name("k").unwrap().as_any().downcast_ref::<Int64Array>().unwrap().clone();
                keys.extend(c.iter().flatten());
            }
            assert!(keys.windows(2).all(|w| w[0] < w[1]), "round {round}: {} is not in key order", a.path);
            assert!(keys.len() <= FILE_ROWS, "round {round}: {} holds {} rows", a.path, keys.len());
            ranges.push((keys[0], keys[keys.len() - 1]));
        }
        let deepest = model
            .keys()
            .step_by(97)
            .map(|k| ranges.iter().filter(|(lo, hi)| (lo..=hi).contains(&k)).count())
            .max()
            .unwrap();
        assert!(
            deepest as i64 <= round + 2,
            "round {round}: a lookup's file skipping leaves {deepest} files (one per merge generation at most)"
        );
        assert!(!dir.path().join(KEYED).join("_change_data").exists(), "no change data written");
        if round == 0 {
            // Marked, not copied: every file of the build stays (a deletion vector on each), and
            // the merge wrote the changed rows alone.
            let kept = active.iter().filter(|a| originals.contains(&a.path)).count();
            assert_eq!(kept, originals.len(), "round 0 rewrote files of the build");
            assert!(active.iter().filter(|a| originals.contains(&a.path)).all(|a| a.deletion_vector.is_some()));
            let written: i64 = active
                .iter()
                .filter(|a| !originals.contains(&a.path))
                .map(|a| a.get_stats().unwrap().unwrap().num_records)
                .sum();
            assert_eq!(written as u64, stats.inserted + stats.updated, "round 0 wrote rows it did not change");
        }
    }
}

/// A merge confined to one partition ([`weir_lake::KeyScope::within`], as a one-make derive
/// merges its make's partition): rows of the partition are replaced, inserted and deleted by
/// the key scope, while another partition holding the same keys is not read or touched; a
/// source row outside the partition is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_confined_to_a_partition_leaves_the_others() {
    const PARTS: &str = "silver/dv_parts";
    let dir = tempfile::tempdir().unwrap();
    let lake =
        Lake::open(LakeLocation::Local { root: dir.path().to_path_buf() }, &S3Settings::default(), false).unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("p", DataType::Int64, false),
        Field::new("k", DataType::Int64, false),
        Field::new("v", DataType::Int64, true),
    ]));
    let rows = |p: i64, keys: std::ops::Range<i64>, v: i64| {
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(keys.clone().map(|_| p))),
                Arc::new(Int64Array::from_iter_values(keys.clone())),
                Arc::new(Int64Array::from_iter_values(keys.map(|k| k * v))),
            ],
        )
        .unwrap()
    };
    // Partition 2 holds keys 50..150, an older copy of 50..100 among them.
    let mut model: BTreeMap<(i64, i64), i64> = (0..100).map(|k| ((1, k), k)).collect();
    model.extend((50..150).map(|k| ((2, k), 2 * k)));
    let table = weir_lake::open_table(&lake, PARTS).await.unwrap();
    let mut w =
        RecordBatchWriter::try_new(lake.table_url(PARTS).as_str(), schema.clone(), Some(vec!["p".into()]), None)
            .unwrap();
    w.write(rows(1, 0..100, 1)).await.unwrap();
    w.write(rows(2, 50..150, 2)).await.unwrap();
    let adds = w.flush().await.unwrap();
    weir_lake::commit_files(table, PARTS, &schema, &["p".to_string()], adds, Default::default(), None, None, None)
        .await
        .unwrap();
    let partition_2 = || async { crate::common::files_by_partition(&lake, PARTS, "p").await.remove(&Some("2".into())) };
    let before = partition_2().await;
    assert!(before.is_some(), "partition 2 has files");

    let source = |p: i64, keys: &[i64]| {
        let mut fields = schema.fields().to_vec();
        fields.push(Arc::new(Field::new(OP_COLUMN, DataType::Utf8, false)));
        RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            vec![
                Arc::new(Int64Array::from_iter_values(keys.iter().map(|_| p))),
                Arc::new(Int64Array::from_iter_values(keys.iter().copied())),
                Arc::new(Int64Array::from_iter_values(keys.iter().map(|k| -k))),
                Arc::new(StringArray::from_iter_values(keys.iter().map(|_| "U"))),
            ],
        )
        .unwrap()
    };
    let merge = |source: RecordBatch, scope: weir_lake::KeyScope| {
        let lake = lake.clone();
        async move {
            let table = weir_lake::open_table(&lake, PARTS).await.unwrap();
            let layout = weir_lake::MergeLayout { key_files: None, no_change_data: true };
            weir_lake::merge_by_key(
                &lake,
                table,
                PARTS,
                source,
                &["k".to_string()],
                props(),
                CommitProperties::default(),
                layout,
                Some(&scope),
            )
            .await
        }
    };
    // Key 60 replaced, 200 inserted, 70 deleted by the scope: in partition 1 alone.
    let scope = weir_lake::KeyScope::new([60, 70, 200]).within("p", "1");
    let (_, stats) = merge(source(1, &[60, 200]), scope.clone()).await.unwrap();
    assert_eq!((stats.inserted, stats.updated, stats.deleted), (1, 1, 1));
    model.insert((1, 60), -60);
    model.insert((1, 200), -200);
    model.remove(&(1, 70));
    let want: Vec<Vec<Option<i64>>> = model.iter().map(|((p, k), v)| vec![Some(*p), Some(*k), Some(*v)]).collect();
    assert_eq!(query_table(&lake, PARTS, "SELECT p, k, v FROM t ORDER BY p, k").await, want);
    assert_eq!(partition_2().await, before, "partition 2's files");

    let err = merge(source(2, &[60]), scope).await.unwrap_err().to_string();
    assert!(err.contains("p=1") && err.contains("outside"), "{err}");
    assert_eq!(query_table(&lake, PARTS, "SELECT p, k, v FROM t ORDER BY p, k").await, want, "nothing written");
}
