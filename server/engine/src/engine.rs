//! The engine: the registry of volumes and jobs, their persistence, and the
//! entry points the front ends (gRPC, NBD) call.

use crate::backend::{BlockBackend, CacheMode, FileBackend, NbdBackend, NbdUri};
use crate::bitmap::DirtyBitmap;
use crate::bufpool::PayloadPool;
use crate::definitions::VolumeDefinitions;
use crate::device::Device;
use crate::error::{EngineError, ErrorKind, Result};
use crate::events::EventLog;
use crate::job::active::ActiveMirror;
use crate::job::spec::{CopyMode, MirrorSpec, TargetSpec};
use crate::job::state::JobStatus;
use crate::job::{Job, JobInfo, JobParts};
use crate::names::validate_name;
use crate::observe::{IoObserver, JobObserver, Observer, WriteLatencySummary};
use crate::store::{ExportRecord, JobRecord, Store};
use crate::throttle::RateLimits;
use crate::volume::{Volume, VolumeRole};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The state directory.
    pub state_dir: PathBuf,
    /// Events kept for replay.
    pub event_history: usize,
    /// Bound on the guest write payloads each volume holds while no job
    /// copies it (a job's `buf_size` bounds them while one does).
    pub volume_inflight_bytes: u32,
}

/// Default of [`EngineConfig::volume_inflight_bytes`]: the default job
/// `buf_size`, so a volume holds as much with a job as without one.
pub const DEFAULT_VOLUME_INFLIGHT_BYTES: u32 = 16 << 20;

/// A read-only picture of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Current backing path.
    pub path: String,
    /// Logical block size.
    pub block_size_bytes: u32,
    /// Write limits.
    pub limits: RateLimits,
    /// The job using it, if any.
    pub job_id: Option<String>,
    /// Opened with `O_DIRECT`.
    pub direct_io: bool,
    /// Write payloads held under the volume's own bound: now, at most so
    /// far, and the bound.
    pub in_flight_bytes: u64,
    /// See [`Self::in_flight_bytes`].
    pub peak_in_flight_bytes: u64,
    /// See [`Self::in_flight_bytes`].
    pub max_in_flight_bytes: u64,
}

type Registry<T> = Arc<Mutex<BTreeMap<String, T>>>;

/// The mirror engine.
#[derive(Debug)]
pub struct Engine {
    store: Arc<Store>,
    volumes: Registry<Arc<Volume>>,
    /// Writes the volume definitions.
    definitions: Arc<VolumeDefinitions>,
    jobs: Registry<Arc<Job>>,
    /// Jobs known only from their records (from before a restart).
    restored: Registry<JobRecord>,
    /// Jobs that were still running when blockmirrord stopped, waiting for
    /// [`Engine::resume_jobs`].
    to_resume: Mutex<Vec<JobRecord>>,
    /// NBD exports by export name.
    exports: Registry<ExportRecord>,
    /// Held while the export definitions are written.
    exports_saves: Mutex<()>,
    events: Arc<EventLog>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// The observer slot shared with every volume and job.
    observer: Observer,
    /// See [`EngineConfig::volume_inflight_bytes`].
    volume_inflight_bytes: u32,
    /// Payload buffers shared by every volume.
    payloads: Arc<PayloadPool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Registries are maps updated by single insert/remove calls; never torn.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn volume_info(v: &Volume) -> VolumeInfo {
    let payloads = v.guest_inflight();
    VolumeInfo {
        name: v.name().to_owned(),
        size_bytes: v.size(),
        path: v.path(),
        block_size_bytes: v.block_size(),
        limits: v.limits(),
        job_id: v.user().map(|(j, _)| j),
        direct_io: v.is_direct(),
        in_flight_bytes: payloads.current,
        peak_in_flight_bytes: payloads.peak,
        max_in_flight_bytes: payloads.capacity,
    }
}

/// Connects to an NBD export on the blocking pool (the handshake blocks).
async fn connect_nbd(uri: &str) -> Result<Arc<dyn BlockBackend>> {
    let parsed = NbdUri::parse(uri)?;
    match tokio::task::spawn_blocking(move || NbdBackend::connect(&parsed)).await {
        // OS-level failures (no socket, refused, unreachable) mean the server
        // is not there; an unknown export stays NOT_FOUND.
        Ok(Err(e)) if e.kind() == ErrorKind::Io || e.raw_os_error().is_some() => {
            Err(EngineError::new(
                ErrorKind::Unavailable,
                format!("cannot reach the NBD server of {uri}: {}", e.chain()),
            ))
        }
        Ok(r) => r.map(|b| Arc::new(b) as Arc<dyn BlockBackend>),
        Err(e) => Err(EngineError::io(
            "connecting to NBD",
            std::io::Error::other(e.to_string()),
        )),
    }
}

/// True for paths that are NBD URIs (volume records keep them as paths).
fn is_nbd_uri(path: &str) -> bool {
    path.starts_with("nbd://") || path.starts_with("nbd+unix://")
}

fn open_file(path: &Path, mode: CacheMode) -> Result<Arc<dyn BlockBackend>> {
    if let Some(uri) = path.to_str().filter(|p| is_nbd_uri(p)) {
        let parsed = NbdUri::parse(uri)?;
        return NbdBackend::connect(&parsed).map(|b| Arc::new(b) as Arc<dyn BlockBackend>);
    }
    let b = FileBackend::open(path, mode)
        .map_err(|e| EngineError::io(format!("opening {}", path.display()), e))?;
    Ok(Arc::new(b))
}

impl Engine {
    /// Opens the state directory and restores volumes and job records.
    ///
    /// # Errors
    /// `Io` if the state directory is unusable.
    pub fn open(config: EngineConfig) -> Result<Arc<Self>> {
        let store = Arc::new(Store::open(&config.state_dir)?);
        let observer = Observer::default();
        // Room for two volumes' worth of payloads at their bound: enough to
        // reuse every buffer of one busy volume, a bounded amount idle.
        let payloads = PayloadPool::new(2 * config.volume_inflight_bytes as usize);
        let mut volumes = BTreeMap::new();
        for rec in store.load_volumes()? {
            match open_file(&rec.path, CacheMode::from_direct_io(rec.direct_io)) {
                Ok(backend) => {
                    let v = Volume::new(
                        rec.name.clone(),
                        backend,
                        rec.limits,
                        config.volume_inflight_bytes,
                        Arc::clone(&payloads),
                        observer.clone(),
                    );
                    volumes.insert(rec.name, v);
                }
                Err(e) => {
                    tracing::error!(volume = %rec.name, error = %e.chain(), "volume not restored")
                }
            }
        }
        let mut restored = BTreeMap::new();
        let mut to_resume = Vec::new();
        for mut rec in store.load_jobs()? {
            if !rec.status.is_terminal() {
                // The pivot saves the volume definitions before the job's
                // record: a source volume on another file than at the start
                // means the pivot is durable even if the record missed it.
                let moved = rec.source_path.as_ref().is_some_and(|start| {
                    volumes
                        .get(&rec.spec.source_volume)
                        .is_some_and(|v| v.path() != *start)
                });
                rec.pivoted |= moved;
                if rec.is_resumable() {
                    to_resume.push(rec);
                    continue;
                }
                // Stopped after its pivot, or while being cancelled (or
                // failing: the error is in the record): that is how it ended.
                rec.status = JobStatus::Concluded;
                store.save_job(&rec)?;
            }
            restored.insert(rec.id.clone(), rec);
        }
        let exports: BTreeMap<String, ExportRecord> = store
            .load_exports()?
            .into_iter()
            .filter(|e| volumes.contains_key(&e.volume))
            .map(|e| (e.name.clone(), e))
            .collect();
        tracing::info!(
            volumes = volumes.len(),
            exports = exports.len(),
            jobs = restored.len(),
            dir = %config.state_dir.display(),
            "state restored"
        );
        let volumes = Arc::new(Mutex::new(volumes));
        Ok(Arc::new(Self {
            definitions: Arc::new(VolumeDefinitions::new(
                Arc::clone(&store),
                Arc::clone(&volumes),
            )),
            store,
            volumes,
            jobs: Arc::default(),
            restored: Arc::new(Mutex::new(restored)),
            to_resume: Mutex::new(to_resume),
            exports: Arc::new(Mutex::new(exports)),
            exports_saves: Mutex::new(()),
            events: Arc::new(EventLog::new(config.event_history)),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            observer,
            volume_inflight_bytes: config.volume_inflight_bytes,
            payloads,
        }))
    }

    /// Installs the observer told about every guest write, copy and job
    /// change (telemetry). Once only; false if one was installed already.
    pub fn set_observer(&self, observer: Arc<dyn IoObserver>) -> bool {
        self.observer.install(observer)
    }

    /// The event log.
    pub fn events(&self) -> &Arc<EventLog> {
        &self.events
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        self.store.dir()
    }

    fn check_open(&self) -> Result<()> {
        if self.shutdown.is_cancelled() {
            return Err(EngineError::new(
                ErrorKind::Unavailable,
                "blockmirrord is shutting down",
            ));
        }
        Ok(())
    }

    // ----- volumes -----

    /// A volume by name.
    ///
    /// # Errors
    /// `NotFound`.
    pub fn volume(&self, name: &str) -> Result<Arc<Volume>> {
        lock(&self.volumes)
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::not_found(format!("volume {name:?} does not exist")))
    }

    fn insert_volume(&self, name: &str, backend: Arc<dyn BlockBackend>) -> Result<VolumeInfo> {
        let v = Volume::new(
            name.to_owned(),
            backend,
            RateLimits::default(),
            self.volume_inflight_bytes,
            Arc::clone(&self.payloads),
            self.observer.clone(),
        );
        {
            let mut vols = lock(&self.volumes);
            if vols.contains_key(name) {
                return Err(EngineError::new(
                    ErrorKind::AlreadyExists,
                    format!("volume {name:?} already exists"),
                ));
            }
            vols.insert(name.to_owned(), Arc::clone(&v));
        }
        if let Err(e) = self.definitions.save() {
            lock(&self.volumes).remove(name);
            return Err(e);
        }
        tracing::info!(volume = name, path = %v.path(), size = v.size(), "volume added");
        Ok(volume_info(&v))
    }

    /// Creates a sparse raw file of `size` bytes and registers it. With the
    /// same name, size and path as an existing volume: returns it.
    ///
    /// # Errors
    /// `InvalidArgument` for a bad name or size, `AlreadyExists`, `Io`.
    pub fn create_volume(&self, name: &str, size: u64, path: Option<&Path>) -> Result<VolumeInfo> {
        self.check_open()?;
        validate_name("volume name", name)?;
        if size == 0 || !size.is_multiple_of(512) {
            return Err(EngineError::invalid(format!(
                "size {size} must be a positive multiple of 512 bytes"
            )));
        }
        let path = path.map_or_else(|| self.store.volume_file(name), Path::to_path_buf);
        if let Ok(v) = self.volume(name) {
            if v.size() == size && Path::new(&v.path()) == path {
                return Ok(volume_info(&v));
            }
            return Err(EngineError::new(
                ErrorKind::AlreadyExists,
                format!("volume {name:?} already exists"),
            ));
        }
        let backend = FileBackend::create(&path, size, CacheMode::Buffered).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                EngineError::new(
                    ErrorKind::AlreadyExists,
                    format!("file {} already exists; attach it instead", path.display()),
                )
            } else {
                EngineError::io(format!("creating {}", path.display()), e)
            }
        })?;
        self.insert_volume(name, Arc::new(backend))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&path);
            })
    }

    /// Registers an existing file or block device.
    ///
    /// # Errors
    /// `InvalidArgument`, `AlreadyExists`, `NotFound` (no such file), `Io`.
    pub fn attach_volume(&self, name: &str, path: &Path, direct_io: bool) -> Result<VolumeInfo> {
        self.check_open()?;
        validate_name("volume name", name)?;
        if path.as_os_str().is_empty() {
            return Err(EngineError::invalid("path is empty"));
        }
        if let Ok(v) = self.volume(name) {
            if Path::new(&v.path()) == path && v.is_direct() == direct_io {
                return Ok(volume_info(&v));
            }
            let how = if v.is_direct() { "with" } else { "without" };
            return Err(EngineError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "volume {name:?} already exists (on {}, {how} direct I/O)",
                    v.path()
                ),
            ));
        }
        if direct_io && path.to_str().is_some_and(is_nbd_uri) {
            return Err(EngineError::invalid(
                "direct I/O applies to files and block devices, not NBD URIs",
            ));
        }
        let backend = open_file(path, CacheMode::from_direct_io(direct_io))?;
        if backend.size() == 0 {
            return Err(EngineError::invalid(format!(
                "{} is empty (0 bytes)",
                path.display()
            )));
        }
        self.insert_volume(name, backend)
    }

    /// Registers a remote NBD export as a volume.
    ///
    /// # Errors
    /// `InvalidArgument` (name, URI), `AlreadyExists`, `NotFound` (no such
    /// export), `Io` (unreachable server).
    pub async fn attach_nbd_volume(&self, name: &str, uri: &str) -> Result<VolumeInfo> {
        self.check_open()?;
        validate_name("volume name", name)?;
        if let Ok(v) = self.volume(name) {
            if v.path() == uri {
                return Ok(volume_info(&v));
            }
            return Err(EngineError::new(
                ErrorKind::AlreadyExists,
                format!("volume {name:?} already exists"),
            ));
        }
        let backend = connect_nbd(uri).await?;
        self.insert_volume(name, backend)
    }

    /// A volume's description.
    ///
    /// # Errors
    /// `NotFound`.
    pub fn get_volume(&self, name: &str) -> Result<VolumeInfo> {
        self.volume(name).map(|v| volume_info(&v))
    }

    /// Every volume, by name.
    pub fn list_volumes(&self) -> Vec<VolumeInfo> {
        lock(&self.volumes)
            .values()
            .map(|v| volume_info(v))
            .collect()
    }

    /// Forgets a volume (its file stays).
    ///
    /// # Errors
    /// `NotFound`; `FailedPrecondition` while a job uses it.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        self.check_open()?;
        let v = self.volume(name)?;
        if let Some((job, _)) = v.user() {
            return Err(EngineError::precondition(format!(
                "volume {name:?} is in use by job {job:?}"
            )));
        }
        lock(&self.volumes).remove(name);
        self.definitions.save()?;
        tracing::info!(volume = name, "volume deleted");
        Ok(())
    }

    /// Sets a volume's write limits.
    ///
    /// # Errors
    /// `NotFound`, `Io` saving the definition.
    pub fn set_volume_limits(&self, name: &str, limits: RateLimits) -> Result<VolumeInfo> {
        let v = self.volume(name)?;
        v.set_limits(limits);
        self.definitions.save()?;
        Ok(volume_info(&v))
    }

    // ----- exports -----

    /// Exports `volume` over NBD as `name` (default: the volume's name).
    /// Idempotent for the same definition.
    ///
    /// # Errors
    /// `InvalidArgument`, `NotFound` (volume), `AlreadyExists` (name taken
    /// by another definition).
    pub fn add_export(
        &self,
        volume: &str,
        name: Option<&str>,
        read_only: bool,
    ) -> Result<ExportRecord> {
        self.check_open()?;
        let name = name.unwrap_or(volume);
        validate_name("export name", name)?;
        self.volume(volume)?;
        let rec = ExportRecord {
            name: name.to_owned(),
            volume: volume.to_owned(),
            read_only,
        };
        {
            let mut exports = lock(&self.exports);
            match exports.get(name) {
                Some(e) if *e == rec => return Ok(rec),
                Some(e) => {
                    return Err(EngineError::new(
                        ErrorKind::AlreadyExists,
                        format!("export {name:?} already exists (volume {:?})", e.volume),
                    ));
                }
                None => {
                    exports.insert(name.to_owned(), rec.clone());
                }
            }
        }
        if let Err(e) = self.save_exports() {
            lock(&self.exports).remove(name);
            return Err(e);
        }
        tracing::info!(export = name, volume, read_only, "export added");
        Ok(rec)
    }

    fn save_exports(&self) -> Result<()> {
        // One writer at a time, picture and write together: two writers
        // could share the temporary file, or the older picture land last.
        let _one_writer = lock(&self.exports_saves);
        let all: Vec<ExportRecord> = lock(&self.exports).values().cloned().collect();
        self.store.save_exports(&all)
    }

    /// Every export, by name.
    pub fn list_exports(&self) -> Vec<ExportRecord> {
        lock(&self.exports).values().cloned().collect()
    }

    /// Stops exporting `name` to new connections.
    ///
    /// # Errors
    /// `NotFound`.
    pub fn remove_export(&self, name: &str) -> Result<()> {
        if lock(&self.exports).remove(name).is_none() {
            return Err(EngineError::not_found(format!(
                "export {name:?} does not exist"
            )));
        }
        self.save_exports()?;
        tracing::info!(export = name, "export removed");
        Ok(())
    }

    /// An export and its volume.
    ///
    /// # Errors
    /// `NotFound`.
    pub fn export(&self, name: &str) -> Result<(ExportRecord, Arc<Volume>)> {
        let rec = lock(&self.exports)
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::not_found(format!("export {name:?} does not exist")))?;
        let v = self.volume(&rec.volume)?;
        Ok((rec, v))
    }

    // ----- jobs -----

    fn job(&self, id: &str) -> Result<Arc<Job>> {
        lock(&self.jobs)
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::not_found(format!("job {id:?} does not exist")))
    }

    fn restored_info(rec: &JobRecord) -> JobInfo {
        let created_at = UNIX_EPOCH + Duration::from_millis(rec.created_at_ms);
        JobInfo {
            id: rec.id.clone(),
            spec: rec.spec.clone(),
            status: rec.status,
            copy_mode: if rec.spec.copy_mode == CopyMode::WriteBlocking {
                CopyMode::WriteBlocking
            } else {
                CopyMode::Background
            },
            actively_synced: false,
            progress: crate::events::Progress::default(),
            speed_bytes_per_sec: rec.spec.speed_bytes_per_sec,
            error: rec.error.clone(),
            created_at,
            updated_at: created_at,
            last_event_sequence: 0,
            in_flight_bytes: 0,
            peak_in_flight_bytes: 0,
            copied_bytes: 0,
            synced_guest_bytes: 0,
            pivoted: rec.pivoted,
            write_latency: WriteLatencySummary::default(),
        }
    }

    /// Starts a mirror. Idempotent on `id`: the same spec returns the job.
    ///
    /// # Errors
    /// `InvalidArgument` (spec), `AlreadyExists` (id with another spec),
    /// `NotFound` (volume), `FailedPrecondition` (volume in use).
    pub async fn start_mirror(&self, id: &str, spec: MirrorSpec) -> Result<JobInfo> {
        self.check_open()?;
        validate_name("job id", id)?;
        spec.validate()?;
        let existing = lock(&self.jobs).get(id).map(|j| j.spec().clone());
        let existing = existing.or_else(|| lock(&self.restored).get(id).map(|r| r.spec.clone()));
        if let Some(existing) = existing {
            if existing == spec {
                return self.get_job(id);
            }
            return Err(EngineError::new(
                ErrorKind::AlreadyExists,
                format!("job {id:?} already exists with another spec"),
            ));
        }
        self.launch(id, spec, None).await
    }

    /// Restarts the jobs that had not finished when blockmirrord stopped
    /// (or crashed), under their ids and specs (paused and standby jobs
    /// start paused). A job whose clean shutdown saved its dirty bitmap
    /// copies what that marks; after a crash the tracked writes are gone,
    /// so it copies its whole source again. Either way it becomes READY
    /// anew; a
    /// completion that had not pivoted yet must be asked for again. Jobs
    /// that were being cancelled, or whose pivot was made, are concluded in
    /// `Engine::open` instead. A job that cannot restart (a volume is gone,
    /// the target does not answer) is kept as concluded, with the reason.
    pub async fn resume_jobs(&self) {
        let pending = std::mem::take(&mut *lock(&self.to_resume));
        // Concurrently: an NBD target that does not answer holds up only
        // its own job (its connect and handshake time out), not the others.
        let launches = pending.into_iter().map(|rec| async move {
            let created = UNIX_EPOCH + Duration::from_millis(rec.created_at_ms);
            let bitmap = self.saved_bitmap(&rec);
            let from_bitmap = bitmap.as_ref().map(DirtyBitmap::count);
            let launched = self
                .launch(&rec.id, rec.spec.clone(), Some((created, bitmap)))
                .await;
            (rec, launched, from_bitmap)
        });
        for (mut rec, launched, from_bitmap) in futures::future::join_all(launches).await {
            match launched {
                Ok(_) => {
                    match from_bitmap {
                        Some(dirty_chunks) => {
                            tracing::info!(job_id = %rec.id, was = %rec.status, dirty_chunks, "job resumed after a restart from the dirty bitmap its shutdown saved")
                        }
                        None => {
                            tracing::info!(job_id = %rec.id, was = %rec.status, "job resumed after a restart; copying the whole source again")
                        }
                    }
                    if matches!(rec.status, JobStatus::Paused | JobStatus::Standby)
                        && let Err(e) = self.pause_job(&rec.id)
                    {
                        tracing::warn!(job_id = %rec.id, error = %e.chain(), "resumed job not paused again");
                    }
                }
                Err(e) => {
                    tracing::error!(job_id = %rec.id, error = %e.chain(), "job not resumed after a restart");
                    rec.status = JobStatus::Concluded;
                    rec.error = Some(format!(
                        "interrupted: blockmirrord restarted and could not resume the job: {}",
                        e.chain()
                    ));
                    if let Err(e) = self.store.save_job(&rec) {
                        tracing::error!(job_id = %rec.id, error = %e.chain(), "saving the job record");
                    }
                    lock(&self.restored).insert(rec.id.clone(), rec);
                }
            }
        }
    }

    /// Builds and starts a job (`resumed_from`: the creation time of the
    /// record it resumes).
    /// The dirty bitmap a clean shutdown saved for `rec`, if it is there,
    /// whole, and the size of the job's bitmap (else the job copies
    /// everything). The file is removed either way: it is good for one
    /// resume only.
    fn saved_bitmap(&self, rec: &JobRecord) -> Option<DirtyBitmap> {
        let taken = self.store.take_bitmap(&rec.id);
        if !rec.dirty_bitmap_saved {
            // Left by a shutdown that stopped before its record said so.
            return None;
        }
        let chunks = self
            .volume(&rec.spec.source_volume)
            .ok()?
            .size()
            .div_ceil(rec.spec.granularity_bytes.max(1));
        let unusable = |why: String| {
            tracing::warn!(job_id = %rec.id, "saved dirty bitmap not used ({why}); the job copies everything");
            None
        };
        match taken {
            Ok(Some(bytes)) => match DirtyBitmap::from_bytes(&bytes) {
                Ok(b) if b.len() == chunks => Some(b),
                Ok(b) => unusable(format!("{} chunks, the job has {chunks}", b.len())),
                Err(e) => unusable(e.to_string()),
            },
            Ok(None) => unusable("the file is missing".into()),
            Err(e) => unusable(e.chain()),
        }
    }

    async fn launch(
        &self,
        id: &str,
        spec: MirrorSpec,
        resumed: Option<(SystemTime, Option<DirtyBitmap>)>,
    ) -> Result<JobInfo> {
        let (resumed_from, resume_bitmap) = resumed.map_or((None, None), |(t, b)| (Some(t), b));
        let source = self.volume(&spec.source_volume)?;
        let size = source.size();
        let (target_volume, target_backend, device) = match &spec.target {
            TargetSpec::Volume(name) => {
                let t = self.volume(name)?;
                if let Some(e) = lock(&self.exports).values().find(|e| e.volume == *name) {
                    return Err(EngineError::precondition(format!(
                        "target volume {name:?} is exported as {:?}; remove the export first (the copy would overwrite what its clients see)",
                        e.name
                    )));
                }
                if t.size() != size {
                    return Err(EngineError::invalid(format!(
                        "target volume {name:?} has {} bytes; the source has {size}",
                        t.size()
                    )));
                }
                let device = t.device();
                (Some(t), device.backend.clone(), device)
            }
            TargetSpec::File(path) => {
                if path.exists() && Path::new(&source.path()) == path.as_path() {
                    return Err(EngineError::invalid("target file is the source's own file"));
                }
                // The target becomes the volume's backend at the pivot, so
                // it is opened the way the source is.
                let mode = CacheMode::from_direct_io(source.is_direct());
                let backend: Arc<dyn BlockBackend> = if path.exists() {
                    let b = open_file(path, mode)?;
                    if b.size() != size {
                        return Err(EngineError::invalid(format!(
                            "target file {} has {} bytes; the source has {size}",
                            path.display(),
                            b.size()
                        )));
                    }
                    b
                } else {
                    Arc::new(FileBackend::create(path, size, mode).map_err(|e| {
                        EngineError::io(format!("creating target file {}", path.display()), e)
                    })?)
                };
                (None, Arc::clone(&backend), Device::unthrottled(backend))
            }
            TargetSpec::Nbd(uri) => {
                let backend = connect_nbd(uri).await?;
                if backend.size() != size {
                    return Err(EngineError::invalid(format!(
                        "target {uri} has {} bytes; the source has {size}",
                        backend.size()
                    )));
                }
                (None, Arc::clone(&backend), Device::unthrottled(backend))
            }
        };
        source.claim(id, VolumeRole::Source)?;
        if let Some(t) = &target_volume
            && let Err(e) = t.claim(id, VolumeRole::Target)
        {
            source.release(id);
            return Err(e);
        }
        // validate() bounds buf_size to 1 GiB, which fits u32.
        let buf = u32::try_from(spec.buf_size_bytes).unwrap_or(u32::MAX);
        let observed = Arc::new(JobObserver::new(
            id,
            &spec.source_volume,
            self.observer.clone(),
        ));
        let mirror = Arc::new(
            ActiveMirror::new(
                size,
                spec.granularity_bytes,
                device,
                buf,
                spec.copy_mode == CopyMode::WriteBlocking,
            )
            .with_latency_limit(spec.policy.target_latency_limit_ms)
            .with_copier_share(
                spec.policy.copier_share_percent,
                spec.policy.copier_time_share_percent,
            )
            .with_observer(Arc::clone(&observed)),
        );
        let job = Job::new(JobParts {
            id: id.to_owned(),
            spec,
            source,
            target_volume,
            target_backend,
            mirror,
            events: Arc::clone(&self.events),
            store: Arc::clone(&self.store),
            shutdown: self.shutdown.child_token(),
            definitions: Arc::clone(&self.definitions),
            resumed_from,
            resume_bitmap,
        });
        {
            let mut jobs = lock(&self.jobs);
            if jobs.contains_key(id) {
                // Another StartMirror with this id won the race while this
                // one connected to its target. The volume claims carry the
                // same id, so they belong to the winner: leave them.
                drop(jobs);
                return self.get_job(id);
            }
            jobs.insert(id.to_owned(), Arc::clone(&job));
        }
        observed.started(&job.spec().target.to_string(), job.spec().copy_mode);
        job.save_async().await;
        let jobs = Arc::clone(&self.jobs);
        job.spawn(&self.tracker, move |job| {
            if job.status() == JobStatus::Concluded
                && job.spec().auto_dismiss
                && job.dismiss().is_ok()
            {
                lock(&jobs).remove(job.id());
            }
        });
        tracing::info!(job_id = id, "mirror started");
        Ok(job.info())
    }

    /// A job's description.
    ///
    /// # Errors
    /// `NotFound`.
    pub fn get_job(&self, id: &str) -> Result<JobInfo> {
        if let Ok(j) = self.job(id) {
            return Ok(j.info());
        }
        lock(&self.restored)
            .get(id)
            .map(Self::restored_info)
            .ok_or_else(|| EngineError::not_found(format!("job {id:?} does not exist")))
    }

    /// Every job, oldest first.
    pub fn list_jobs(&self) -> Vec<JobInfo> {
        let mut all: Vec<JobInfo> = lock(&self.restored)
            .values()
            .map(Self::restored_info)
            .collect();
        all.extend(lock(&self.jobs).values().map(|j| j.info()));
        all.sort_by_key(|j| j.created_at);
        all
    }

    fn restored_verb(&self, id: &str, verb: crate::job::state::Verb) -> EngineError {
        match lock(&self.restored)
            .get(id)
            .map(|r| r.status.check(id, verb))
        {
            Some(Err(refused)) => refused,
            // A restored job is concluded: dismiss is the only verb it
            // allows, and dismiss does not come through here.
            Some(Ok(())) => {
                EngineError::precondition(format!("job {id:?} was restored from its record"))
            }
            None => EngineError::not_found(format!("job {id:?} does not exist")),
        }
    }

    fn with_job(
        &self,
        id: &str,
        verb: crate::job::state::Verb,
        f: impl FnOnce(&Job) -> Result<JobInfo>,
    ) -> Result<JobInfo> {
        match self.job(id) {
            Ok(j) => f(&j),
            Err(_) => Err(self.restored_verb(id, verb)),
        }
    }

    /// Pauses copying. # Errors: `NotFound`, `FailedPrecondition`.
    pub fn pause_job(&self, id: &str) -> Result<JobInfo> {
        self.with_job(id, crate::job::state::Verb::Pause, Job::pause)
    }
    /// Resumes copying. # Errors: `NotFound`, `FailedPrecondition`.
    pub fn resume_job(&self, id: &str) -> Result<JobInfo> {
        self.with_job(id, crate::job::state::Verb::Resume, Job::resume)
    }
    /// Sets the copy rate limit. # Errors: `NotFound`, `FailedPrecondition`.
    pub fn set_job_speed(&self, id: &str, bytes_per_sec: u64) -> Result<JobInfo> {
        self.with_job(id, crate::job::state::Verb::SetSpeed, |j| {
            j.set_speed(bytes_per_sec)
        })
    }
    /// Changes the copy mode. # Errors: `NotFound`, `FailedPrecondition`.
    pub fn change_job(&self, id: &str, mode: CopyMode) -> Result<JobInfo> {
        self.with_job(id, crate::job::state::Verb::Change, |j| j.change_mode(mode))
    }
    /// Completes (pivots). # Errors: `NotFound`, `FailedPrecondition`.
    pub fn complete_job(&self, id: &str) -> Result<JobInfo> {
        self.with_job(id, crate::job::state::Verb::Complete, Job::complete)
    }
    /// Cancels. # Errors: `NotFound`, `FailedPrecondition`.
    pub fn cancel_job(&self, id: &str, force: bool) -> Result<JobInfo> {
        self.with_job(id, crate::job::state::Verb::Cancel, |j| j.cancel(force))
    }
    /// Finalizes a pending job. # Errors: `NotFound`, `FailedPrecondition`.
    pub fn finalize_job(&self, id: &str) -> Result<JobInfo> {
        self.with_job(id, crate::job::state::Verb::Finalize, Job::finalize)
    }

    /// Dismisses a concluded job: it is forgotten.
    ///
    /// # Errors
    /// `NotFound`, `FailedPrecondition`.
    pub fn dismiss_job(&self, id: &str) -> Result<JobInfo> {
        if let Ok(j) = self.job(id) {
            let info = j.dismiss()?;
            lock(&self.jobs).remove(id);
            return Ok(info);
        }
        let rec = lock(&self.restored).remove(id);
        let Some(mut rec) = rec else {
            return Err(EngineError::not_found(format!("job {id:?} does not exist")));
        };
        self.store.remove_job(id)?;
        self.events
            .emit(id, crate::events::EventKind::StatusChange(JobStatus::Null));
        self.events.emit(id, crate::events::EventKind::Dismissed);
        rec.status = JobStatus::Null;
        Ok(Self::restored_info(&rec))
    }

    /// Waits until the job is in one of `until` or `timeout` passes.
    ///
    /// # Errors
    /// `NotFound`; `InvalidArgument` for an empty `until`.
    pub async fn wait_job(
        &self,
        id: &str,
        until: &[JobStatus],
        timeout: Duration,
    ) -> Result<JobInfo> {
        if until.is_empty() {
            return Err(EngineError::invalid("until must name at least one state"));
        }
        match self.job(id) {
            Ok(j) => Ok(j.wait(until, timeout).await),
            Err(_) => self.get_job(id),
        }
    }

    /// Stops every job (records saved; guest writes in flight finish) and
    /// flushes every volume. Waits at most `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(?grace, "jobs did not stop within the grace period");
        }
        let volumes: Vec<Arc<Volume>> = lock(&self.volumes).values().cloned().collect();
        for v in volumes {
            if let Err(e) = Device::unthrottled(v.backend()).flush().await {
                tracing::error!(volume = v.name(), error = %e.chain(), "flush at shutdown");
            }
        }
    }

    /// Seconds since the Unix epoch of `t` (for front ends).
    pub fn unix_time(t: SystemTime) -> (i64, u32) {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::spec::CopyMode;
    use crate::job::state::JobStatus;

    fn spec() -> MirrorSpec {
        MirrorSpec::for_tests()
    }

    /// An engine on a fresh state directory (kept alive by the returned
    /// guard) with volumes `src` and `dst` of `size` bytes.
    fn engine_with_volumes(size: u64) -> (tempfile::TempDir, Arc<Engine>) {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let engine = Engine::open(EngineConfig {
            state_dir: dir.path().join("state"),
            event_history: 64,
            volume_inflight_bytes: DEFAULT_VOLUME_INFLIGHT_BYTES,
        })
        .unwrap();
        engine.create_volume("src", size, None).unwrap();
        engine.create_volume("dst", size, None).unwrap();
        (dir, engine)
    }

    /// A job paused before its runner started (still `created`) becomes
    /// `paused` when the runner starts, through `running` (created → paused
    /// is not a transition), and copies nothing until resumed.
    #[tokio::test]
    async fn a_job_paused_while_created_starts_paused() {
        let (_dir, engine) = engine_with_volumes(1 << 20);
        let job = engine.start_mirror("j", spec()).await.unwrap();
        // The runner task has not run yet on this single-threaded runtime.
        assert_eq!(job.status, JobStatus::Created);
        assert_eq!(engine.pause_job("j").unwrap().status, JobStatus::Created);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while engine.get_job("j").unwrap().status == JobStatus::Created {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the runner never started"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let paused = engine.get_job("j").unwrap();
        assert_eq!(paused.status, JobStatus::Paused, "{paused:?}");
        engine.resume_job("j").unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while engine.get_job("j").unwrap().status != JobStatus::Ready {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never ready after resume"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// The first pass leaves a region guests keep writing for last: in
    /// write-blocking mode their writes to it then stay source-only (its
    /// chunks are still dirty) while the copier carries the rest of the
    /// disk, instead of going to the target from the moment the copier
    /// passed it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_pass_copies_the_guests_working_set_last() {
        const SIZE: u64 = 16 << 20;
        let (_dir, engine) = engine_with_volumes(SIZE);
        let source = engine.volume("src").unwrap();
        for mib in 0..SIZE >> 20 {
            let data = bytes::Bytes::from(vec![7u8; 1 << 20]);
            source.write(mib << 20, data, false).await.unwrap();
        }
        // A guest rewriting the fifth MiB every few milliseconds, from
        // before the job to its end.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guest = {
            let (source, stop) = (Arc::clone(&source), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let offset = (4 << 20) + (i * 12_345) % ((1 << 20) - 4096);
                    source
                        .write(offset, bytes::Bytes::from(vec![1u8; 4096]), false)
                        .await
                        .unwrap();
                    i += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
                }
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let mut s = spec();
        s.copy_mode = CopyMode::WriteBlocking;
        s.speed_bytes_per_sec = 8 << 20;
        engine.start_mirror("j", s).await.unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        // The copier has passed the region in disk order.
        let passed = loop {
            let j = engine.get_job("j").unwrap();
            if j.copied_bytes >= 10 << 20 {
                break j;
            }
            assert!(tokio::time::Instant::now() < deadline, "{j:?}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        assert_eq!(
            passed.synced_guest_bytes, 0,
            "the working set was copied early: guest writes to it went to the target: {passed:?}"
        );
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while engine.get_job("j").unwrap().status != JobStatus::Ready {
            assert!(tokio::time::Instant::now() < deadline, "never ready");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        guest.await.unwrap();
        // The counter the check above relies on does count: once the
        // working set is clean, writes to it go to both sides.
        let ready = engine.get_job("j").unwrap();
        assert!(ready.synced_guest_bytes > 0, "{ready:?}");
        assert!(ready.copied_bytes <= SIZE + (1 << 20), "{ready:?}");
    }
}
