//! The volume definitions on disk (`volumes.json`): written by one writer
//! at a time, and, for a pivot, written before guest I/O is held so that
//! the pause only has to install them.
//!
//! Why a pivot cannot simply save after the pause: writes acknowledged once
//! guests resume reach the target alone, so the definitions naming the
//! target must be durable before the pause ends — a crash must not bring the
//! volume back on its old file. Writing and syncing a file is the costly
//! part (about 0.35 ms here); a rename and a directory sync (about
//! 0.25 ms) is all that is left under the pause.

use crate::backend::BlockBackend;
use crate::error::Result;
use crate::store::{PreparedVolumes, Store, VolumeRecord};
use crate::volume::Volume;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The registry of volumes by name, shared with the engine.
pub(crate) type VolumeMap = Arc<Mutex<BTreeMap<String, Arc<Volume>>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are replaced whole; never torn.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Writes the definitions of the engine's volumes.
#[derive(Debug)]
pub(crate) struct VolumeDefinitions {
    store: Arc<Store>,
    volumes: VolumeMap,
    /// Saves so far. Held while a picture of the volumes is taken and
    /// written, so two writers cannot interleave (the older picture could
    /// land last); and a prepared pivot is current only if no save came
    /// after it.
    saves: Mutex<u64>,
}

/// A pivot's definitions, durable but not installed yet.
#[derive(Debug)]
pub(crate) struct PreparedPivot {
    files: PreparedVolumes,
    saves_before: u64,
}

/// What a pivot changes: `source` is backed by `target`'s file from now
/// on, and the volume `absorbed` (the target's own, if it had one) goes.
#[derive(Clone, Copy)]
pub(crate) struct Pivot<'a> {
    pub source: &'a str,
    pub target: &'a dyn BlockBackend,
    pub absorbed: Option<&'a str>,
}

impl VolumeDefinitions {
    pub(crate) fn new(store: Arc<Store>, volumes: VolumeMap) -> Self {
        Self {
            store,
            volumes,
            saves: Mutex::new(0),
        }
    }

    /// The definitions of the volumes now, or as they will be after `pivot`.
    fn records(&self, pivot: Option<Pivot<'_>>) -> Vec<VolumeRecord> {
        lock(&self.volumes)
            .values()
            .filter(|v| pivot.is_none_or(|p| p.absorbed != Some(v.name())))
            .map(|v| {
                let mut rec = VolumeRecord {
                    name: v.name().to_owned(),
                    path: PathBuf::from(v.path()),
                    limits: v.limits(),
                    direct_io: v.is_direct(),
                };
                if let Some(p) = pivot.filter(|p| p.source == v.name()) {
                    rec.path = PathBuf::from(p.target.path());
                    rec.direct_io = p.target.is_direct();
                }
                rec
            })
            .collect()
    }

    /// Saves the definitions of the volumes as they are now.
    ///
    /// # Errors
    /// `Io` if the file cannot be written.
    pub(crate) fn save(&self) -> Result<()> {
        let mut saves = lock(&self.saves);
        // Counted even when it fails: the file may have changed anyway.
        *saves += 1;
        self.store.save_volumes(&self.records(None))
    }

    /// Writes, durably, the definitions as they will be after `pivot`,
    /// for [`Self::commit_pivot`] to install. `job` names the file.
    ///
    /// # Errors
    /// `Io` if the file cannot be written.
    pub(crate) fn prepare_pivot(&self, job: &str, pivot: Pivot<'_>) -> Result<PreparedPivot> {
        let saves = lock(&self.saves);
        let files = self
            .store
            .prepare_volumes(job, &self.records(Some(pivot)))?;
        Ok(PreparedPivot {
            files,
            saves_before: *saves,
        })
    }

    /// Makes a pivot durable, once the source volume is on its new file in
    /// memory: forgets `absorbed`, then installs `prepared` if no save came
    /// after it (nothing else changed on disk), or saves everything.
    ///
    /// # Errors
    /// `Io` if the definitions could not be made durable.
    pub(crate) fn commit_pivot(
        &self,
        prepared: Option<PreparedPivot>,
        absorbed: Option<&str>,
    ) -> Result<()> {
        if let Some(name) = absorbed {
            lock(&self.volumes).remove(name);
        }
        let mut saves = lock(&self.saves);
        *saves += 1;
        match prepared {
            Some(p) if p.saves_before + 1 == *saves => self.store.install_volumes(p.files),
            stale => {
                if let Some(p) = stale {
                    self.store.discard_volumes(p.files);
                }
                self.store.save_volumes(&self.records(None))
            }
        }
    }

    /// Deletes the file of a pivot that did not happen.
    pub(crate) fn discard(&self, prepared: PreparedPivot) {
        self.store.discard_volumes(prepared.files);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{CacheMode, FileBackend};
    use crate::bufpool::PayloadPool;
    use crate::observe::Observer;
    use crate::throttle::RateLimits;

    struct Fixture {
        dir: tempfile::TempDir,
        store: Arc<Store>,
        defs: VolumeDefinitions,
        target: Arc<dyn BlockBackend>,
    }

    fn volume(dir: &std::path::Path, name: &str) -> Arc<Volume> {
        let path = dir.join(format!("{name}.raw"));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let backend = Arc::new(FileBackend::open(&path, CacheMode::Buffered).unwrap());
        Volume::new(
            name.to_owned(),
            backend,
            RateLimits::default(),
            1 << 20,
            PayloadPool::new(1 << 20),
            Observer::default(),
        )
    }

    /// Volumes `src` and `dst` (`dst` backed by `target`), saved.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("state")).unwrap());
        let (src, dst) = (volume(dir.path(), "src"), volume(dir.path(), "dst"));
        let target = dst.backend();
        let volumes: VolumeMap = Arc::new(Mutex::new(BTreeMap::from([
            ("src".to_owned(), src),
            ("dst".to_owned(), dst),
        ])));
        let defs = VolumeDefinitions::new(Arc::clone(&store), volumes);
        defs.save().unwrap();
        Fixture {
            dir,
            store,
            defs,
            target,
        }
    }

    fn paths(store: &Store) -> Vec<(String, String)> {
        store
            .load_volumes()
            .unwrap()
            .into_iter()
            .map(|r| (r.name, r.path.file_name().unwrap().to_string_lossy().into()))
            .collect()
    }

    fn pivot(f: &Fixture) -> Pivot<'_> {
        Pivot {
            source: "src",
            target: f.target.as_ref(),
            absorbed: Some("dst"),
        }
    }

    fn leftovers(f: &Fixture) -> Vec<String> {
        std::fs::read_dir(f.dir.path().join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".prepared") || n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn a_prepared_pivot_changes_nothing_until_it_is_committed() {
        let f = fixture();
        let before = paths(&f.store);
        let prepared = f.defs.prepare_pivot("j", pivot(&f)).unwrap();
        assert_eq!(paths(&f.store), before, "prepared, not installed");
        f.defs.commit_pivot(Some(prepared), Some("dst")).unwrap();
        assert_eq!(paths(&f.store), vec![("src".into(), "dst.raw".into())]);
        assert!(leftovers(&f).is_empty(), "{:?}", leftovers(&f));
    }

    #[test]
    fn a_save_after_the_prepare_makes_the_commit_save_everything() {
        let f = fixture();
        let prepared = f.defs.prepare_pivot("j", pivot(&f)).unwrap();
        // A volume added while the pivot drained guest I/O: the prepared
        // file does not know it, so it must not be installed.
        let extra = volume(f.dir.path(), "extra");
        lock(&f.defs.volumes).insert("extra".into(), extra);
        f.defs.save().unwrap();
        // The pivot itself, in memory, as the job does it.
        lock(&f.defs.volumes)["src"].set_backend(Arc::clone(&f.target));
        f.defs.commit_pivot(Some(prepared), Some("dst")).unwrap();
        assert_eq!(
            paths(&f.store),
            vec![
                ("extra".into(), "extra.raw".into()),
                ("src".into(), "dst.raw".into())
            ]
        );
        assert!(leftovers(&f).is_empty(), "{:?}", leftovers(&f));
    }

    #[test]
    fn concurrent_saves_leave_every_volume_on_disk() {
        let f = fixture();
        std::thread::scope(|s| {
            for i in 0..8 {
                let (defs, dir) = (&f.defs, f.dir.path());
                s.spawn(move || {
                    let name = format!("v{i}");
                    let v = volume(dir, &name);
                    lock(&defs.volumes).insert(name, v);
                    defs.save().unwrap();
                });
            }
        });
        assert_eq!(f.store.load_volumes().unwrap().len(), 10);
        assert!(leftovers(&f).is_empty(), "{:?}", leftovers(&f));
    }

    #[test]
    fn a_discarded_pivot_leaves_the_definitions_and_no_file() {
        let f = fixture();
        let before = paths(&f.store);
        let prepared = f.defs.prepare_pivot("j", pivot(&f)).unwrap();
        f.defs.discard(prepared);
        assert_eq!(paths(&f.store), before);
        assert!(leftovers(&f).is_empty(), "{:?}", leftovers(&f));
    }

    #[test]
    fn a_prepared_file_left_by_a_crash_is_removed_at_open() {
        let f = fixture();
        let prepared = f.defs.prepare_pivot("j", pivot(&f)).unwrap();
        std::mem::forget(prepared);
        assert_eq!(leftovers(&f).len(), 1);
        let reopened = Store::open(&f.dir.path().join("state")).unwrap();
        assert!(leftovers(&f).is_empty(), "{:?}", leftovers(&f));
        assert_eq!(reopened.load_volumes().unwrap().len(), 2);
    }
}
