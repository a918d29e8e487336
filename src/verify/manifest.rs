//! The lake's file lists, spilled to verify's directory: each compared table's files as
//! the commit log names them, and as its folder holds them. A year of 5-second commits
//! names millions of files; verify holds one checkpoint of the log, one listing page
//! and one bucket of keys at a time, so its memory does not grow with the lake's age.
//!
//! A file in a table's folder that no commit names and no writer has announced is a
//! stray (query engines read it; a replay does not). Both lists are cut into buckets by
//! a hash of the key, and each bucket is compared in memory on its own.

use std::collections::HashSet;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use object_store::ObjectStore;

use super::VerifyError;
use crate::sink::WrittenObject;

/// Keys per bucket of the stray check (a few MiB of paths in memory).
const KEYS_PER_BUCKET: u64 = 100_000;

/// A table's files as the commit log names them, one JSON line each, the newest record
/// first (`files` and `bytes` count those no compaction replaced).
pub(super) struct TableFiles {
    path: PathBuf,
    pub files: u64,
    pub bytes: u64,
}

/// What of a file the lake side reads.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Entry {
    pub key: String,
    pub rows: u64,
    pub first_lsn: u64,
    pub first_seq: u64,
    /// A compaction replaced it: not read, but not a stray while it is still there.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replaced: bool,
}

impl TableFiles {
    /// The files, read back from the spill as they are asked for.
    pub fn entries(&self) -> Result<impl Iterator<Item = Result<Entry, String>> + Send + use<>, std::io::Error> {
        let file = std::io::BufReader::new(std::fs::File::open(&self.path)?);
        Ok(file.lines().map(|line| {
            let line = line.map_err(|e| e.to_string())?;
            serde_json::from_str(&line).map_err(|e| e.to_string())
        }))
    }
}

fn spill_err(dir: &Path) -> impl Fn(std::io::Error) -> VerifyError + '_ {
    move |source| VerifyError::Spill {
        dir: dir.display().to_string(),
        source,
    }
}

/// Reads the commit log once, writing the files of each of `tables` to its own list,
/// with those a compaction replaced marked (they stay in the lake for
/// `compaction.delete_after`: not strays, not read).
pub(super) async fn spill_committed(
    store: &dyn ObjectStore,
    tables: &[String],
    dir: &Path,
) -> Result<Vec<TableFiles>, VerifyError> {
    let mut out = Vec::new();
    let mut writers = Vec::new();
    for i in 0..tables.len() {
        let path = dir.join(format!("committed-{i}.jsonl"));
        writers.push(BufWriter::new(std::fs::File::create(&path).map_err(spill_err(dir))?));
        out.push(TableFiles {
            path,
            files: 0,
            bytes: 0,
        });
    }
    let index: std::collections::HashMap<&str, usize> =
        tables.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut failed = None;
    let Some(head) = crate::checkpoint::read_head(store).await? else {
        return Ok(out);
    };
    crate::checkpoint::walk_manifest(store, &head, 1, |l| {
        let f: WrittenObject = l.file;
        let Some(&i) = index.get(f.table.as_str()) else {
            return Ok(());
        };
        let entry = Entry {
            key: f.key,
            rows: f.rows,
            first_lsn: f.first.lsn.0,
            first_seq: f.first.seq,
            replaced: l.replaced,
        };
        if !l.replaced {
            out[i].files += 1;
            out[i].bytes += f.bytes;
        }
        let line = serde_json::to_string(&entry).expect("an entry serializes");
        if let Err(e) = writeln!(writers[i], "{line}") {
            failed.get_or_insert(e);
        }
        Ok(())
    })
    .await?;
    if let Some(e) = failed {
        return Err(spill_err(dir)(e));
    }
    for w in writers {
        w.into_inner().map_err(|e| spill_err(dir)(e.into_error()))?;
    }
    Ok(out)
}

/// A table's folder, listed: its Parquet files, one path a line.
pub(super) struct Listing {
    path: PathBuf,
    pub count: u64,
}

/// Lists the Parquet files in the folder of `table` (every partition) into a spill.
pub(super) async fn spill_listing(
    store: &dyn ObjectStore,
    table: &str,
    dir: &Path,
    i: usize,
) -> Result<Listing, VerifyError> {
    let (schema, name) = table.split_once('.').unwrap_or(("", table));
    let prefix = object_store::path::Path::from_iter([schema, name]);
    let path = dir.join(format!("listed-{i}.txt"));
    let mut w = BufWriter::new(std::fs::File::create(&path).map_err(spill_err(dir))?);
    let mut count = 0;
    let mut listed = store.list(Some(&prefix));
    while let Some(meta) = listed.try_next().await.map_err(|e| VerifyError::Lake {
        key: prefix.to_string(),
        what: e.to_string(),
    })? {
        if meta.location.as_ref().ends_with(".parquet") {
            writeln!(w, "{}", meta.location).map_err(spill_err(dir))?;
            count += 1;
        }
    }
    w.flush().map_err(spill_err(dir))?;
    Ok(Listing { path, count })
}

/// The paths of `listing` that `committed` does not name and `announced` does not list,
/// compared a bucket at a time. Both spills are consumed.
pub(super) fn strays(
    listing: Listing,
    committed: &TableFiles,
    announced: &HashSet<object_store::path::Path>,
    dir: &Path,
) -> Result<Vec<object_store::path::Path>, VerifyError> {
    strays_by(listing, committed, announced, dir, KEYS_PER_BUCKET)
}

fn strays_by(
    listing: Listing,
    committed: &TableFiles,
    announced: &HashSet<object_store::path::Path>,
    dir: &Path,
    keys_per_bucket: u64,
) -> Result<Vec<object_store::path::Path>, VerifyError> {
    let err = spill_err(dir);
    let buckets = (listing.count.max(committed.files)).div_ceil(keys_per_bucket).max(1) as usize;
    let bucket_of = |key: &str| (twox_hash::XxHash3_64::oneshot(key.as_bytes()) % buckets as u64) as usize;
    // As paths, the form a listing gives (a key with escapes parses to the same path).
    let split = |what: &str,
                 keys: &mut dyn Iterator<Item = Result<String, VerifyError>>|
     -> Result<Vec<PathBuf>, VerifyError> {
        let paths: Vec<PathBuf> = (0..buckets).map(|b| dir.join(format!("{what}-{b}.txt"))).collect();
        let mut writers = paths
            .iter()
            .map(|p| std::fs::File::create(p).map(BufWriter::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(&err)?;
        for key in keys {
            let key = key?;
            writeln!(writers[bucket_of(&key)], "{key}").map_err(&err)?;
        }
        for w in &mut writers {
            w.flush().map_err(&err)?;
        }
        Ok(paths)
    };
    let listed_lines = std::io::BufReader::new(std::fs::File::open(&listing.path).map_err(&err)?).lines();
    let listed = split("listed-bucket", &mut listed_lines.map(|l| l.map_err(&err)))?;
    let mut named = committed.entries().map_err(&err)?.map(|e| {
        e.map(|e| crate::sink::key_path(&e.key).to_string())
            .map_err(|what| VerifyError::Compare {
                table: committed.path.display().to_string(),
                what,
            })
    });
    let named = split("named-bucket", &mut named)?;
    let _ = std::fs::remove_file(&listing.path);
    let mut out = Vec::new();
    for (l, n) in listed.iter().zip(&named) {
        let set: HashSet<String> = std::io::BufReader::new(std::fs::File::open(n).map_err(&err)?)
            .lines()
            .collect::<Result<_, _>>()
            .map_err(&err)?;
        for line in std::io::BufReader::new(std::fs::File::open(l).map_err(&err)?).lines() {
            let line = line.map_err(&err)?;
            // The listing's own (encoded) form.
            let path = object_store::path::Path::parse(&line)
                .unwrap_or_else(|_| object_store::path::Path::from(line.as_str()));
            if !set.contains(&line) && !announced.contains(&path) {
                out.push(path);
            }
        }
        let _ = std::fs::remove_file(l);
        let _ = std::fs::remove_file(n);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 250 files in 3 buckets, escaped partition values among them: the strays are the
    /// listed files neither committed nor announced, whatever bucket they fall in.
    #[test]
    fn strays_are_found_a_bucket_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let key = |i: u32| format!("public/t/sym=A%2FB{}/{i:08}.parquet", i % 7);
        let mut listed = std::fs::File::create(dir.path().join("l.txt")).unwrap();
        let mut committed = std::fs::File::create(dir.path().join("c.jsonl")).unwrap();
        let mut expected = Vec::new();
        let mut announced = HashSet::new();
        for i in 0..250 {
            writeln!(listed, "{}", key(i)).unwrap();
            match i % 10 {
                // Neither: a stray.
                3 => expected.push(key(i)),
                // Announced by a writer (an upload under way).
                7 => {
                    announced.insert(crate::sink::key_path(&key(i)));
                }
                // Named, or replaced by a compaction and not deleted yet: no stray.
                _ => {
                    let e = Entry {
                        key: key(i),
                        rows: 1,
                        first_lsn: 1,
                        first_seq: 0,
                        replaced: i % 10 == 5,
                    };
                    writeln!(committed, "{}", serde_json::to_string(&e).unwrap()).unwrap();
                }
            }
        }
        // Committed, not in the folder: not a stray (verify finds it missing elsewhere).
        let gone = Entry {
            key: "public/t/sym=X/gone.parquet".into(),
            rows: 1,
            first_lsn: 1,
            first_seq: 0,
            replaced: false,
        };
        writeln!(committed, "{}", serde_json::to_string(&gone).unwrap()).unwrap();
        let listing = Listing {
            path: dir.path().join("l.txt"),
            count: 250,
        };
        let files = TableFiles {
            path: dir.path().join("c.jsonl"),
            files: 201,
            bytes: 0,
        };
        let mut found: Vec<String> = strays_by(listing, &files, &announced, dir.path(), 100)
            .unwrap()
            .iter()
            .map(|p| p.to_string())
            .collect();
        found.sort();
        expected.sort();
        assert_eq!(found, expected);
    }
}
