#![allow(clippy::unwrap_used)]
//! The measuring tools under `chaos-tests/tools` that docs/benchmarks.md quotes.

use std::process::Command;

/// `compactions.py` sums what each column family's compactions wrote and counts the files
/// moved without a rewrite, from lines in the format RocksDB 8 writes to its LOG.
#[test]
fn compactions_py_sums_rewritten_mb_by_column_family_and_counts_moves() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("LOG");
    let compacted = |cf: &str, out: &str| {
        format!(
            "2026/12/05-09:22:14.424029 11262 (Original Log Time 2026/12/05-09:22:14.423973) \
             [db/compaction/compaction_job.cc:908] [{cf}] compacted to: base level 6 level \
             multiplier 10.00 max bytes base 268435456 files[3 0 0 0 0 0 2] max score 0.75, \
             MB/sec: 41.7 rd, 41.7 wr, level 6, files in(1, 1) out(1 +0 blob) MB in(2.8, 0.6 \
             +0.0 blob) out({out} +0.0 blob), read-write-amplify(2.4) write-amplify(1.2) OK, \
             records in: 100145, records dropped: 0 output_compression: NoCompression\n"
        )
    };
    let moved = "2026/12/05-09:21:56.663822 11262 (Original Log Time 2026/12/05-09:21:56.662479) \
                 [db/db_impl/db_impl_compaction_flush.cc:3748] [entries_by_selector] Moving #9 \
                 to level-6 192115 bytes\n";
    let text = [
        compacted("entries", "36.9"),
        moved.to_owned(),
        compacted("entries_by_parent", "3.6"),
        compacted("entries", "20.0"),
        moved.to_owned(),
        "2026/12/05-09:21:56.6 11262 [entries] Compacting 1@0 + 1@6 files to L6\n".to_owned(),
    ]
    .concat();
    std::fs::write(&log, text).unwrap();
    let tool = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/compactions.py");
    let out = Command::new("python3")
        .arg(tool)
        .arg(&log)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout,
        format!(
            "{}: MB rewritten by compactions: entries 56.9, entries_by_parent 3.6; files \
             moved: 2\n",
            log.display()
        )
    );
    // A file that cannot be read is an error, not an empty summary.
    let out = Command::new("python3")
        .arg(tool)
        .arg(dir.path().join("missing"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}
