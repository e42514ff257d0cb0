//! The embedded state directory: volume definitions and job records, each
//! written atomically (temporary file, fsync, rename), so a crash leaves
//! either the old or the new version.
//!
//! Layout: `STATE/volumes.json`, `STATE/exports.json`, `STATE/jobs/ID.json`,
//! `STATE/jobs/ID.bitmap` (the dirty bitmap of a job stopped by a clean
//! shutdown), and created volume files under `STATE/volumes/`.

use crate::error::{EngineError, Result};
use crate::job::spec::MirrorSpec;
use crate::job::state::JobStatus;
use crate::throttle::RateLimits;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A volume definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Name.
    pub name: String,
    /// Backing file or device (the target's after a pivot).
    pub path: PathBuf,
    /// Write limits.
    #[serde(default)]
    pub limits: RateLimits,
    /// Opened with `O_DIRECT`.
    #[serde(default)]
    pub direct_io: bool,
}

/// A volume exported over NBD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    /// Export name clients ask for.
    pub name: String,
    /// The volume behind it.
    pub volume: String,
    /// Writes are refused with EPERM.
    pub read_only: bool,
}

/// What is kept of a job across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Job id.
    pub id: String,
    /// The spec it was started with.
    pub spec: MirrorSpec,
    /// Last recorded state.
    pub status: JobStatus,
    /// Error, if it failed.
    pub error: Option<String>,
    /// Whether the pivot happened.
    pub pivoted: bool,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// The source volume's file when the job started: if the volume names
    /// another file now, the pivot was made durable even though this record
    /// missed it (the volume definitions are saved first).
    #[serde(default)]
    pub source_path: Option<String>,
    /// A cancel was asked for (a job in `waiting` may be completing or
    /// cancelling; only a completion is resumed).
    #[serde(default)]
    pub cancel_requested: bool,
    /// A clean shutdown saved the job's dirty bitmap (`jobs/ID.bitmap`)
    /// with both sides flushed and the source closed to writes, so the job
    /// can resume from it instead of copying everything. Saved after the
    /// bitmap: the record is the commit point.
    #[serde(default)]
    pub dirty_bitmap_saved: bool,
}

impl JobRecord {
    /// Whether blockmirrord restarts this job when it starts: it had not
    /// ended, was not being cancelled or failing, and had not pivoted.
    pub fn is_resumable(&self) -> bool {
        !self.status.is_terminal()
            && !self.pivoted
            && !self.cancel_requested
            && self.status != JobStatus::Aborting
    }
}

/// Makes a rename or removal in `path`'s directory durable.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Writes `bytes` to `path` (replacing it) and makes them durable.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let what = format!("writing {}", path.display());
    let mut f = fs::File::create(path).map_err(io_err(what.clone()))?;
    f.write_all(bytes).map_err(io_err(what.clone()))?;
    f.sync_all().map_err(io_err(what))
}

/// Renames the durable file `from` over `to` and makes the rename durable.
fn install(from: &Path, to: &Path) -> Result<()> {
    let what = format!("writing {}", to.display());
    fs::rename(from, to).map_err(io_err(what.clone()))?;
    sync_parent(to).map_err(io_err(what))
}

/// Ends the name of volume definitions written ahead and not installed.
const PREPARED_SUFFIX: &str = ".prepared";

/// Volume definitions written ahead (see [`Store::prepare_volumes`]).
#[derive(Debug)]
pub struct PreparedVolumes {
    path: PathBuf,
}

/// Access to the state directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> EngineError {
    move |e| EngineError::io(what, e)
}

impl Store {
    /// Opens (creating if needed) the state directory.
    ///
    /// # Errors
    /// `Io` if the directories cannot be created.
    pub fn open(dir: &Path) -> Result<Self> {
        for sub in [dir.to_path_buf(), dir.join("jobs"), dir.join("volumes")] {
            fs::create_dir_all(&sub).map_err(io_err(format!(
                "creating state directory {}",
                sub.display()
            )))?;
        }
        // Definitions a pivot wrote ahead and never installed (it stopped
        // before its commit): never valid after a restart.
        if let Ok(entries) = fs::read_dir(dir) {
            for path in entries.flatten().map(|e| e.path()) {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.starts_with("volumes.json.") && name.ends_with(PREPARED_SUFFIX) {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where created volumes go by default.
    pub fn volume_file(&self, name: &str) -> PathBuf {
        self.dir.join("volumes").join(format!("{name}.raw"))
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = with_suffix(path, ".tmp");
        write_synced(&tmp, bytes)?;
        install(&tmp, path)
    }

    fn bitmap_path(&self, id: &str) -> PathBuf {
        self.dir.join("jobs").join(format!("{id}.bitmap"))
    }

    /// Saves a job's serialised dirty bitmap (see
    /// [`JobRecord::dirty_bitmap_saved`]).
    ///
    /// # Errors
    /// `Io` if the file cannot be written.
    pub fn save_bitmap(&self, id: &str, bytes: &[u8]) -> Result<()> {
        self.write_atomic(&self.bitmap_path(id), bytes)
    }

    /// Reads a job's saved dirty bitmap and removes it, durably, before
    /// returning it: a bitmap is good for one resume only (the resumed job
    /// tracks writes in memory from then on, so after a crash the file would
    /// be stale). `None` if there is none.
    ///
    /// # Errors
    /// `Io` if it cannot be read or removed.
    pub fn take_bitmap(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let path = self.bitmap_path(id);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(EngineError::io(format!("reading {}", path.display()), e)),
        };
        self.remove_bitmap(id)?;
        Ok(Some(bytes))
    }

    /// Removes a job's saved dirty bitmap, if any.
    ///
    /// # Errors
    /// `Io` if it exists but cannot be removed.
    pub fn remove_bitmap(&self, id: &str) -> Result<()> {
        let path = self.bitmap_path(id);
        let what = format!("removing {}", path.display());
        match fs::remove_file(&path) {
            Ok(()) => sync_parent(&path).map_err(io_err(what)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(EngineError::io(what, e)),
        }
    }

    fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                EngineError::io(
                    format!("parsing {}", path.display()),
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(EngineError::io(format!("reading {}", path.display()), e)),
        }
    }

    /// All volume definitions.
    ///
    /// # Errors
    /// `Io` on an unreadable or corrupt file.
    pub fn load_volumes(&self) -> Result<Vec<VolumeRecord>> {
        Ok(Self::read_json(&self.dir.join("volumes.json"))?.unwrap_or_default())
    }

    /// Replaces all volume definitions.
    ///
    /// # Errors
    /// `Io` if the file cannot be written.
    pub fn save_volumes(&self, volumes: &[VolumeRecord]) -> Result<()> {
        let bytes =
            serde_json::to_vec_pretty(volumes).map_err(|e| EngineError::invalid(e.to_string()))?;
        self.write_atomic(&self.dir.join("volumes.json"), &bytes)
    }

    /// Writes the volume definitions `volumes` to a file of their own and
    /// makes it durable, without installing it: the costly half of
    /// [`Self::save_volumes`], for a caller that must install them later
    /// quickly (a pivot, while guest I/O is held). One prepared set at a
    /// set per `tag` (a job id) at a time: preparing again replaces it.
    ///
    /// # Errors
    /// `Io` if the file cannot be written.
    pub fn prepare_volumes(&self, tag: &str, volumes: &[VolumeRecord]) -> Result<PreparedVolumes> {
        let bytes =
            serde_json::to_vec_pretty(volumes).map_err(|e| EngineError::invalid(e.to_string()))?;
        let path = with_suffix(
            &self.dir.join("volumes.json"),
            &format!(".{tag}{PREPARED_SUFFIX}"),
        );
        write_synced(&path, &bytes)?;
        Ok(PreparedVolumes { path })
    }

    /// Installs prepared volume definitions: one rename and one directory
    /// sync.
    ///
    /// # Errors
    /// `Io` if the rename or the sync fails.
    pub fn install_volumes(&self, prepared: PreparedVolumes) -> Result<()> {
        install(&prepared.path, &self.dir.join("volumes.json"))
    }

    /// Deletes prepared volume definitions that will not be installed.
    pub fn discard_volumes(&self, prepared: PreparedVolumes) {
        if let Err(e) = fs::remove_file(&prepared.path) {
            tracing::warn!(path = %prepared.path.display(), error = %e, "removing unused volume definitions");
        }
    }

    /// All export definitions.
    ///
    /// # Errors
    /// `Io` on an unreadable or corrupt file.
    pub fn load_exports(&self) -> Result<Vec<ExportRecord>> {
        Ok(Self::read_json(&self.dir.join("exports.json"))?.unwrap_or_default())
    }

    /// Replaces all export definitions.
    ///
    /// # Errors
    /// `Io` if the file cannot be written.
    pub fn save_exports(&self, exports: &[ExportRecord]) -> Result<()> {
        let bytes =
            serde_json::to_vec_pretty(exports).map_err(|e| EngineError::invalid(e.to_string()))?;
        self.write_atomic(&self.dir.join("exports.json"), &bytes)
    }

    /// All job records.
    ///
    /// # Errors
    /// `Io` on an unreadable directory or a corrupt record.
    pub fn load_jobs(&self) -> Result<Vec<JobRecord>> {
        let dir = self.dir.join("jobs");
        let entries = fs::read_dir(&dir).map_err(io_err(format!("listing {}", dir.display())))?;
        let mut jobs = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(io_err(format!("listing {}", dir.display())))?
                .path();
            if path.extension().is_some_and(|e| e == "json")
                && let Some(job) = Self::read_json(&path)?
            {
                jobs.push(job);
            }
        }
        jobs.sort_by_key(|j: &JobRecord| j.created_at_ms);
        Ok(jobs)
    }

    /// Saves one job record.
    ///
    /// # Errors
    /// `Io` if the file cannot be written.
    pub fn save_job(&self, job: &JobRecord) -> Result<()> {
        let bytes =
            serde_json::to_vec_pretty(job).map_err(|e| EngineError::invalid(e.to_string()))?;
        self.write_atomic(
            &self.dir.join("jobs").join(format!("{}.json", job.id)),
            &bytes,
        )
    }

    /// Forgets a job record.
    ///
    /// # Errors
    /// `Io` if the file exists but cannot be removed.
    pub fn remove_job(&self, id: &str) -> Result<()> {
        self.remove_bitmap(id)?;
        let path = self.dir.join("jobs").join(format!("{id}.json"));
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(EngineError::io(format!("removing {}", path.display()), e))
            }
            _ => Ok(()),
        }
    }
}
