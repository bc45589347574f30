//! State integrity (issue #19): a control plane whose data directory is
//! damaged or incomplete refuses to start, naming what is missing, and
//! generates nothing over it; restored, it starts as the same installation.
//! Each row damages a copy of a real data directory.

use crate::common;

use std::path::{Path, PathBuf};

use common::*;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

fn truncate_by(path: &Path, cut: u64) {
    let len = std::fs::metadata(path).expect("metadata").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.set_len(len.saturating_sub(cut)).expect("truncate");
}

fn sled_snapshots(db: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(db)
        .expect("read_dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("snap."))
        })
        .collect()
}

/// What a damaged start must do.
enum Outcome {
    /// Refuse, with a message containing this.
    Refuse(&'static str),
    /// Refuse with a clear message, or start as the same installation.
    RefuseOrSameRoot,
}

struct Row {
    name: &'static str,
    damage: fn(&Path),
    outcome: Outcome,
    /// Files that must not have been created by the refused start.
    not_created: &'static [&'static str],
}

#[tokio::test]
async fn a_damaged_control_plane_directory_is_refused_never_reinitialised() {
    let (mut l, _clock) = lattice().await;
    // Some history: revocations to lose.
    for i in 0..50 {
        l.revoke(lattice_shared::revocation::Target::Jti(format!("r{i}")))
            .expect("revoke");
    }
    let root = std::fs::read(l.root_pem()).expect("root.crt");
    let dir = l.cp_cfg.data_dir.clone();
    l.stop_cp().await.expect("stop");
    let backup = tempfile::tempdir().expect("tempdir");
    copy_dir(&dir, backup.path());

    let rows = [
        Row {
            name: "store deleted",
            damage: |d| std::fs::remove_dir_all(d.join("db")).expect("rm db"),
            outcome: Outcome::Refuse("db is missing"),
            not_created: &["db"],
        },
        Row {
            name: "kek.key deleted",
            damage: |d| std::fs::remove_file(d.join("kek.key")).expect("rm kek.key"),
            outcome: Outcome::Refuse("kek.key is missing"),
            not_created: &["kek.key"],
        },
        Row {
            name: "KMS KEK version 1 deleted",
            damage: |d| std::fs::remove_file(d.join("kms/kek-v00000001")).expect("rm kek-v1"),
            outcome: Outcome::Refuse("kek-v00000001 is missing"),
            not_created: &["kms/kek-v00000001"],
        },
        Row {
            name: "store replaced by an empty one",
            damage: |d| {
                std::fs::remove_dir_all(d.join("db")).expect("rm db");
                drop(lattice_shared::store::SledStore::open(&d.join("db")).expect("empty store"));
            },
            outcome: Outcome::Refuse("holds no root CA"),
            not_created: &[],
        },
        Row {
            name: "installation record damaged",
            damage: |d| {
                std::fs::write(d.join("installation.json"), b"{\"format\":").expect("write")
            },
            outcome: Outcome::Refuse("is damaged"),
            not_created: &[],
        },
        Row {
            name: "installation record deleted, store emptied",
            damage: |d| {
                std::fs::remove_file(d.join("installation.json")).expect("rm record");
                std::fs::remove_dir_all(d.join("db")).expect("rm db");
                drop(lattice_shared::store::SledStore::open(&d.join("db")).expect("empty store"));
            },
            outcome: Outcome::Refuse("holds no root CA and there is no installation.json"),
            not_created: &[],
        },
        Row {
            name: "store truncated to 0",
            damage: |d| truncate_by(&d.join("db/db"), u64::MAX),
            outcome: Outcome::RefuseOrSameRoot,
            not_created: &[],
        },
        Row {
            name: "store cut in half",
            damage: |d| {
                let len = std::fs::metadata(d.join("db/db")).expect("len").len();
                truncate_by(&d.join("db/db"), len / 2);
            },
            outcome: Outcome::RefuseOrSameRoot,
            not_created: &[],
        },
        Row {
            name: "store's last 64 KiB cut",
            damage: |d| truncate_by(&d.join("db/db"), 64 << 10),
            outcome: Outcome::RefuseOrSameRoot,
            not_created: &[],
        },
        Row {
            name: "store's last 1 MiB cut, snapshot deleted",
            damage: |d| {
                for s in sled_snapshots(&d.join("db")) {
                    std::fs::remove_file(s).expect("rm snapshot");
                }
                truncate_by(&d.join("db/db"), 1 << 20);
            },
            outcome: Outcome::RefuseOrSameRoot,
            not_created: &[],
        },
        Row {
            name: "store garbled in the middle",
            damage: |d| {
                use std::io::{Seek, SeekFrom, Write};
                let path = d.join("db/db");
                let len = std::fs::metadata(&path).expect("len").len();
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .expect("open");
                f.seek(SeekFrom::Start(len / 3)).expect("seek");
                f.write_all(&[0xA5; 8192]).expect("garble");
            },
            outcome: Outcome::RefuseOrSameRoot,
            not_created: &[],
        },
    ];

    let mut report = Vec::new();
    for row in &rows {
        std::fs::remove_dir_all(&dir).expect("clear");
        copy_dir(backup.path(), &dir);
        (row.damage)(&dir);
        let started = l.restart_cp().await;
        let outcome = match (&row.outcome, &started) {
            (_, Err(e)) => {
                let msg = format!("{e:#}");
                if let Outcome::Refuse(want) = row.outcome {
                    assert!(
                        msg.contains(want),
                        "{}: refused, but not saying {want:?}: {msg}",
                        row.name
                    );
                }
                for f in row.not_created {
                    assert!(
                        !dir.join(f).exists(),
                        "{}: the refused start created {f}",
                        row.name
                    );
                }
                format!("refused: {msg}")
            }
            (Outcome::Refuse(want), Ok(())) => {
                panic!("{}: started; it must refuse ({want:?})", row.name)
            }
            (Outcome::RefuseOrSameRoot, Ok(())) => "started".to_string(),
        };
        // Whatever happened, never a new root.
        assert_eq!(
            std::fs::read(l.root_pem()).expect("root.crt"),
            root,
            "{}: root.crt was replaced",
            row.name
        );
        if started.is_ok() {
            l.stop_cp().await.expect("stop");
        }
        report.push(format!("{}: {outcome}", row.name));
    }
    eprintln!("{}", report.join("\n"));

    // Restored, it is the same installation and the caches follow it.
    std::fs::remove_dir_all(&dir).expect("clear");
    copy_dir(backup.path(), &dir);
    l.restart_cp().await.expect("the restored directory starts");
    assert_eq!(std::fs::read(l.root_pem()).expect("root.crt"), root);
    l.caches[0]
        .wait_fresh()
        .await
        .expect("the cache is fresh against the restored control plane");
    l.shutdown().await;
}

/// A data directory from before installation records (state whole, no
/// record) gets its record at the next start, and is then held to it.
#[tokio::test]
async fn a_directory_from_before_records_gets_one_and_is_held_to_it() {
    let (mut l, _clock) = lattice().await;
    let dir = l.cp_cfg.data_dir.clone();
    l.stop_cp().await.expect("stop");
    let record = dir.join("installation.json");
    std::fs::remove_file(&record).expect("as before records");
    l.restart_cp()
        .await
        .expect("an unrecorded, whole directory starts");
    assert!(record.exists(), "the record was written");
    l.stop_cp().await.expect("stop");
    std::fs::remove_file(dir.join("kek.key")).expect("rm kek.key");
    let e = l.restart_cp().await.expect_err("held to its record");
    assert!(format!("{e:#}").contains("kek.key is missing"), "{e:#}");
    assert!(!dir.join("kek.key").exists(), "no new kek.key");
    l.shutdown().await;
}
