//! NCCL ranks: one GPU per rank, through cudarc, behind the same [`Communicator`] interface.
//!
//! Two ways to start them, as with torch:
//! - [`launch`]: one process, one thread per GPU (rank r drives device r), with the shape and
//!   the failure semantics of the [thread launcher](super::thread::launch), which it reuses.
//! - [`NcclComm::from_env`]: one process per GPU, on one node or many, started by a launcher
//!   such as torchrun (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`). Rank 0
//!   makes the NCCL unique id, the [rendezvous](super::rendezvous) hands it to every process, and
//!   each process drives device `LOCAL_RANK`.
//!
//! ## Host buffers, staged
//! The interface takes host slices, as every [`Communicator`] does (see [the module
//! doc](super)). So every call stages its buffers through device memory: copy host -> device on
//! the rank's stream, run the NCCL collective on that stream, wait for it, copy device -> host.
//! The device buffers are kept and reused (they only grow), so a training step allocates
//! nothing. This costs two PCIe copies per call that a real run would not make (four, for a
//! tensor that lives on the GPU and is copied out to call us): a device-buffer path, where
//! tensors already on the GPU go to NCCL directly, is not built yet.
//!
//! ## What the byte counts mean
//! NCCL picks its own algorithm (ring, tree, NVLS, ...) and protocol per call, and does not
//! report what it moved. [`NcclComm::stats`] therefore counts what the [ring algorithm](super::ring)
//! would move for the same call: the theoretical bytes, identical to what thread ranks measure
//! for the same calls, not a measurement of NCCL.
//!
//! ## Failures
//! A collective waits for its stream by polling an event, not by blocking in the driver, so
//! that it can give up: when another rank of the same [`launch`] fails (an error or a panic),
//! every rank's pending or next call aborts its NCCL communicator and returns
//! [`CommError::PeerFailed`]; a call that has not completed after [`NcclComm::timeout`] aborts
//! and returns a timeout error. What this cannot bound, and the thread ranks can:
//! - `ncclCommInitRank` (making a communicator, in [`launch`], [`NcclComm::from_env`] and
//!   [`Communicator::split`]) and the first call on a communicator (when NCCL connects the
//!   ranks) block inside NCCL until every rank has come. So all our own setup that can fail
//!   runs first, and a barrier confirms that every rank is ready before any enters
//!   `ncclCommInitRank` (within a process, the thread ranks' barrier; across processes, the
//!   rendezvous; in a split, a message from each member to the group's rank 0): a rank that
//!   fails to start fails before the others are stuck.
//! - A rank that returns early (its closure ends while others still call collectives) leaves
//!   them waiting until the timeout: NCCL cannot tell "not yet" from "never". Nor can it tell a
//!   slow rank from a dead one, which is why the timeout (30 minutes,
//!   [`DEFAULT_TIMEOUT`](super::DEFAULT_TIMEOUT), or [`TIMEOUT_VAR`](super::TIMEOUT_VAR)) is
//!   far longer than any save.
//! - Across processes there is no shared failure state: a dead process is noticed by the
//!   timeout (or by NCCL itself, as a remote error).
//! - NCCL does not check that ranks pass buffers of the same size, or call the same
//!   collectives: a mismatch is undefined (wrong results or a timeout), where thread ranks
//!   return [`CommError::InvalidArgument`].
//! - Dropping a communicator tears it down at once with `ncclCommAbort` (cudarc's `Drop`; its
//!   safe API has no `ncclCommFinalize`), which does not wait for the last sends of this rank
//!   to reach its peers. [`launch`] therefore keeps the communicators its ranks drop until every
//!   rank has returned. A process of a multi-process job should call [`Communicator::barrier`]
//!   before it drops its communicator and exits.
//!
//! ## Where the libraries come from
//! cudarc loads `libcuda` and `libnccl` at run time (`fallback-dynamic-loading`), so this
//! module compiles and links everywhere; without a driver, [`cuda_devices`] and [`launch`]
//! return an error and never call into CUDA (every cudarc call would panic). cudarc looks for
//! NCCL as `libnccl.so` (and a few versioned names), not `libnccl.so.2`: a machine with only
//! the runtime package needs the development package, or a `libnccl.so` link to `libnccl.so.2`
//! in a directory on `LD_LIBRARY_PATH`. The CUDA version of the bindings is the
//! `CUDARC_CUDA_VERSION` variable (`.cargo/config.toml`; the environment overrides it).

use super::launcher::{LaunchError, panic_message};
use super::mailbox::Failure;
use super::rendezvous::{RendezvousConfig, rendezvous};
use super::thread::{self, ThreadComm};
use super::{Collective, CommError, CommStats, Communicator, Rank, ReduceOp, timeout_from_env};
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DriverError};
use cudarc::nccl::result::NcclError;
use cudarc::nccl::sys::ncclResult_t;
use cudarc::nccl::{Comm, Id};
use std::ffi::c_char;
use std::fmt::{self, Display};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How long [`NcclComm::from_env`] waits for every process to reach the rendezvous: processes
/// of a multi-node job start minutes apart when nodes load the program from a shared disk.
pub const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(300);

/// The oldest NCCL we accept: 2.10 brought `ncclAvg`.
const MIN_NCCL: (u32, u32) = (2, 10);

/// Bytes in an NCCL unique id, and the f32 values that carry it through a communicator.
const ID_BYTES: usize = 128;
const ID_VALUES: usize = ID_BYTES / 4;

/// How long a poll of the stream sleeps, at most: the latency we add to a collective that
/// takes longer than the first few polls.
const MAX_POLL_PAUSE: Duration = Duration::from_millis(1);

// ---------------------------------------------------------------------------------------------
// Is there a GPU?

fn backend(message: impl Into<String>) -> CommError {
    CommError::Backend(message.into())
}

fn cuda_error(what: &str, e: DriverError) -> CommError {
    backend(format!("CUDA error while {what}: {e}"))
}

/// NCCL's own words for each result code (`ncclGetErrorString`), so that an error reads the same
/// whether or not the library can still be asked: cudarc's `NcclError` has no `Display`.
pub fn nccl_error_message(code: ncclResult_t) -> &'static str {
    match code {
        ncclResult_t::ncclSuccess => "no error",
        ncclResult_t::ncclUnhandledCudaError => "unhandled cuda error (run with NCCL_DEBUG=INFO for details)",
        ncclResult_t::ncclSystemError => "unhandled system error (run with NCCL_DEBUG=INFO for details)",
        ncclResult_t::ncclInternalError => "internal error - please report this issue to the NCCL developers",
        ncclResult_t::ncclInvalidArgument => "invalid argument (run with NCCL_DEBUG=WARN for details)",
        ncclResult_t::ncclInvalidUsage => "invalid usage (run with NCCL_DEBUG=WARN for details)",
        ncclResult_t::ncclRemoteError => "remote process exited or there was a network error",
        ncclResult_t::ncclInProgress => "NCCL operation in progress",
        ncclResult_t::ncclTimeout => "NCCL operation timed out",
        ncclResult_t::ncclNumResults => "unknown result code",
    }
}

fn nccl_error(what: &str, e: NcclError) -> CommError {
    let code = e.0;
    backend(format!("NCCL error while {what}: {code:?} ({}): {}", code as u32, nccl_error_message(code)))
}

/// Whether the CUDA driver library (`libcuda`) can be loaded. Asked once per process.
pub fn cuda_driver_present() -> bool {
    crate::cuda::driver_present()
}

/// Whether the NCCL library can be loaded, under the names cudarc looks for.
pub fn nccl_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: as for `cuda_driver_present`.
    *PRESENT.get_or_init(|| unsafe { cudarc::nccl::sys::is_culib_present() })
}

use crate::cuda::library_names;

fn no_driver() -> CommError {
    backend(format!(
        "no CUDA driver: none of {} could be loaded, so NCCL ranks cannot run on this machine (they \
         need an NVIDIA GPU and its driver; thread ranks run anywhere)",
        library_names("cuda")
    ))
}

/// The number of CUDA devices, 0 where a driver is installed but no GPU is visible. An error,
/// never a panic, where no CUDA driver is installed at all (no call reaches cudarc then: every
/// cudarc call panics without the library).
pub fn cuda_devices() -> Result<usize, CommError> {
    if !cuda_driver_present() {
        return Err(no_driver());
    }
    crate::cuda::device_count().map_err(|e| backend(e.0))
}

/// The version of the NCCL library that will be loaded, as (major, minor, patch). An error if
/// there is none, or if it is older than 2.10.
pub fn nccl_version() -> Result<(u32, u32, u32), CommError> {
    if !nccl_present() {
        return Err(backend(format!(
            "NCCL is not installed: none of {} could be loaded (install NCCL's development package, \
             or link libnccl.so to libnccl.so.2 in a directory on LD_LIBRARY_PATH)",
            library_names("nccl")
        )));
    }
    let code = cudarc::nccl::result::get_nccl_version().map_err(|e| nccl_error("asking its version", e))?;
    let code = u32::try_from(code).unwrap_or(0);
    // NCCL_VERSION_CODE is major·10000 + minor·100 + patch since 2.9, major·1000 + ... before.
    let version = if code >= 10_000 {
        (code / 10_000, code % 10_000 / 100, code % 100)
    } else {
        (code / 1_000, code % 1_000 / 100, code % 100)
    };
    if (version.0, version.1) < MIN_NCCL {
        let (major, minor, patch) = version;
        return Err(backend(format!(
            "NCCL {major}.{minor}.{patch} is too old: {}.{} or later is needed (for ncclAvg)",
            MIN_NCCL.0, MIN_NCCL.1
        )));
    }
    Ok(version)
}

fn missing_device(who: &str, device: usize, devices: usize) -> CommError {
    let plural = if devices == 1 { "" } else { "s" };
    backend(format!(
        "{who} needs CUDA device {device} (NCCL ranks need one device each), but this machine has {devices} \
         CUDA device{plural}"
    ))
}

/// Checks that device `device` exists; the error names `who` needs it.
fn check_device(device: usize, who: &str) -> Result<(), CommError> {
    let devices = cuda_devices()?;
    if device >= devices {
        return Err(missing_device(who, device, devices));
    }
    Ok(())
}

/// A context, a stream and an event on device `ordinal`: everything a rank needs before NCCL.
fn open_device(ordinal: usize) -> Result<(Arc<CudaStream>, CudaEvent), CommError> {
    let ctx = CudaContext::new(ordinal).map_err(|e| cuda_error(&format!("opening device {ordinal}"), e))?;
    let stream = ctx.new_stream().map_err(|e| cuda_error("creating a stream", e))?;
    let done = ctx.new_event(None).map_err(|e| cuda_error("creating an event", e))?;
    Ok((stream, done))
}

// ---------------------------------------------------------------------------------------------
// The unique id, as values a communicator can carry.

/// The 128 bytes of an id as 32 f32 values (bit patterns, never arithmetic: copies keep them).
fn pack_id(id: &Id) -> [f32; ID_VALUES] {
    let bytes: Vec<u8> = id.internal().iter().map(|c| c.to_ne_bytes()[0]).collect();
    let mut values = [0.0; ID_VALUES];
    for (v, b) in values.iter_mut().zip(bytes.chunks_exact(4)) {
        *v = f32::from_bits(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    }
    values
}

fn unpack_id(values: &[f32; ID_VALUES]) -> Id {
    let mut bytes = [0u8; ID_BYTES];
    for (b, v) in bytes.chunks_exact_mut(4).zip(values) {
        b.copy_from_slice(&v.to_bits().to_le_bytes());
    }
    id_from_bytes(&bytes)
}

fn id_from_bytes(bytes: &[u8; ID_BYTES]) -> Id {
    Id::uninit(bytes.map(|b| c_char::from_ne_bytes([b])))
}

fn new_id() -> Result<Id, CommError> {
    Id::new().map_err(|e| nccl_error("making a unique id (ncclGetUniqueId)", e))
}

// ---------------------------------------------------------------------------------------------
// What the ranks of one `launch` share.

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The device side of a communicator: the NCCL communicator and its staging buffers.
struct Endpoint {
    comm: Comm,
    /// In-place calls (all-reduce, broadcast, send, recv) use `input` only.
    input: Option<CudaSlice<f32>>,
    output: Option<CudaSlice<f32>>,
}

// SAFETY: cudarc's `Comm` is not `Send` only because it holds NCCL's raw `ncclComm_t`. NCCL
// allows a communicator to be used from any thread as long as one thread at a time uses it
// ("Thread Safety" in NCCL's user guide), and an `Endpoint` is only reached through `&mut` (or
// owned). Every other field is `Send`.
unsafe impl Send for Endpoint {}

/// Drops (and so aborts: cudarc's `Drop` for `Comm` calls `ncclCommAbort`) an endpoint. cudarc
/// panics if the abort fails; that is caught here, as a drop must not unwind.
fn discard(endpoint: Endpoint) {
    let _ = endpoint.comm.context().bind_to_thread();
    let _ = catch_unwind(AssertUnwindSafe(move || drop(endpoint)));
}

/// The fate of the ranks of one [`launch`], and the communicators they are done with.
struct World {
    failed: AtomicBool,
    failure: Mutex<Option<Failure>>,
    /// Communicators dropped by their rank, kept until every rank has returned: tearing one down
    /// (`ncclCommAbort`) while a peer's last operation may still read from it would break that
    /// operation. `None` once [`launch`] has returned: a communicator that outlives it (returned
    /// by its rank) is torn down when dropped.
    retired: Mutex<Option<Vec<Endpoint>>>,
    /// Ranks whose closure has returned (or panicked).
    ended: AtomicUsize,
}

impl World {
    fn new() -> World {
        let (failed, failure, ended) = (AtomicBool::new(false), Mutex::new(None), AtomicUsize::new(0));
        World { failed, failure, retired: Mutex::new(Some(Vec::new())), ended }
    }

    /// Keeps `endpoint` until the launch ends, or tears it down now if it has ended.
    fn retire(&self, endpoint: Endpoint) {
        let mut retired = lock(&self.retired);
        match retired.as_mut() {
            Some(list) => list.push(endpoint),
            None => {
                drop(retired);
                discard(endpoint);
            }
        }
    }

    /// Records the first failure; later ones are the other ranks learning of it.
    fn fail(&self, failure: Failure) {
        lock(&self.failure).get_or_insert(failure);
        self.failed.store(true, Ordering::Release);
    }

    fn failure(&self) -> Option<Failure> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.failure).clone()
    }
}

impl Drop for World {
    /// The communicators still kept when the last rank lets go (after a launch that returned
    /// without waiting for a rank that was left behind).
    fn drop(&mut self) {
        let retired = self.retired.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        retired.into_iter().flatten().for_each(discard);
    }
}

/// Counts a rank's closure as ended when it returns or unwinds.
struct Ended<'a>(&'a AtomicUsize);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

// ANCHOR: launch
/// Runs `f` once per rank, rank r on its own thread with an [`NcclComm`] on CUDA device r, and
/// returns the results in rank order, or the first failure (an error or a panic), like
/// [`thread::launch`]. Fails with one [`LaunchError::Failed`] (rank 0's, or the first rank
/// without a device), before starting any thread, where there is no CUDA driver, fewer devices
/// than ranks, or no NCCL. Like the thread launcher, it reports a failure within
/// [`thread::FAILURE_GRACE`] even if some rank never returns. `world_size` 0 runs nothing and
/// returns no results.
pub fn launch<T, E, F>(world_size: usize, f: F) -> Result<Vec<T>, LaunchError>
where
    T: Send + 'static,
    E: Display,
    F: Fn(NcclComm) -> Result<T, E> + Send + Sync + 'static,
{
    if world_size == 0 {
        return Ok(Vec::new());
    }
    // The first rank that cannot start: the last one when there are too few devices.
    let cannot_start = |rank: Rank, e: CommError| LaunchError::Failed { rank, message: e.to_string() };
    let devices = cuda_devices().map_err(|e| cannot_start(0, e))?;
    if devices < world_size {
        return Err(cannot_start(devices, missing_device(&format!("rank {devices}"), devices, devices)));
    }
    nccl_version().map_err(|e| cannot_start(0, e))?;
    let world = Arc::new(World::new());
    // The thread launcher starts the threads, catches panics and collects the results; `world`
    // adds what it cannot see: NCCL calls poll it, so one rank's failure ends the others' waits.
    let ranks_world = world.clone();
    let result = thread::launch(world_size, move |control| {
        let (world, rank) = (&ranks_world, control.rank());
        let _ended = Ended(&world.ended);
        let run = || -> Result<T, String> {
            let comm = NcclComm::in_process(control, world).map_err(|e| e.to_string())?;
            f(comm).map_err(|e| format!("{e:#}"))
        };
        match catch_unwind(AssertUnwindSafe(run)) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(message)) => {
                world.fail(Failure { rank, message: message.clone(), panicked: false });
                Err(message)
            }
            Err(payload) => {
                world.fail(Failure { rank, message: panic_message(&*payload), panicked: true });
                resume_unwind(payload)
            }
        }
    });
    // Once every rank has returned, nothing can still be reading from a communicator. A rank
    // left behind after a failure may: the communicators then go with the last `world`.
    if world.ended.load(Ordering::SeqCst) == world_size {
        let retired = lock(&world.retired).take();
        retired.into_iter().flatten().for_each(discard);
    }
    // `world` saw each failure before the thread launcher did (a rank records it, then returns),
    // so its first is the first; the launcher's may be a peer that learned of it sooner.
    result.map_err(|e| world.failure().map_or(e, LaunchError::from))
}
// ANCHOR_END: launch

// ---------------------------------------------------------------------------------------------
// The communicator.

/// One rank's NCCL communicator over a group of GPUs. `Send` (it can move to a communication
/// thread, one thread at a time), not `Sync`. Two communicators of one device (a parent and a
/// communicator split from it) must not run calls at the same time from two threads: NCCL may
/// deadlock then (until the timeout ends it).
pub struct NcclComm {
    /// `None` once aborted (`broken` says why).
    endpoint: Option<Endpoint>,
    broken: Option<CommError>,
    stream: Arc<CudaStream>,
    /// Recorded after each call's work: polled to wait for it.
    done: CudaEvent,
    /// Shared with the other ranks of a [`launch`]; `None` across processes.
    world: Option<Arc<World>>,
    /// World rank of each group rank.
    members: Arc<[Rank]>,
    rank: Rank,
    timeout: Duration,
    stats: CommStats,
}

impl fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("members", &self.members)
            .field("device", &self.device())
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if let Some(endpoint) = self.endpoint.take() {
            match &self.world {
                Some(world) => world.retire(endpoint),
                None => discard(endpoint),
            }
        }
    }
}

impl NcclComm {
    fn new(
        comm: Comm,
        stream: Arc<CudaStream>,
        done: CudaEvent,
        world: Option<Arc<World>>,
        members: Arc<[Rank]>,
        rank: Rank,
        timeout: Duration,
    ) -> NcclComm {
        let endpoint = Some(Endpoint { comm, input: None, output: None });
        let (broken, stats) = (None, CommStats::default());
        NcclComm { endpoint, broken, stream, done, world, members, rank, timeout, stats }
    }

    /// Rank `control.rank()` of a [`launch`], on the device of that number. Rank 0 makes the
    /// unique id and broadcasts it through the thread ranks' communicator `control`. The barrier
    /// after it makes sure that every rank has its device and the id before any enters
    /// `ncclCommInitRank`, which would wait forever for a rank that failed (the broadcast alone
    /// does not: its root returns as soon as it has sent).
    fn in_process(mut control: ThreadComm, world: &Arc<World>) -> Result<NcclComm, CommError> {
        let (rank, n, timeout) = (control.rank(), control.world_size(), control.timeout());
        let (stream, done) = open_device(rank)?;
        let mut id = [0.0; ID_VALUES];
        if rank == 0 {
            id = pack_id(&new_id()?);
        }
        control.broadcast(&mut id, 0)?;
        control.barrier()?;
        let comm = Comm::from_rank(stream.clone(), rank, n, unpack_id(&id))
            .map_err(|e| nccl_error("making the communicator (ncclCommInitRank)", e))?;
        Ok(NcclComm::new(comm, stream, done, Some(world.clone()), (0..n).collect(), rank, timeout))
    }

    /// This process's communicator in a job started by torchrun or any launcher that sets
    /// `WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` (see
    /// [`rendezvous`](super::rendezvous)). Waits up to [`RENDEZVOUS_TIMEOUT`] for the others.
    pub fn from_env() -> Result<NcclComm, CommError> {
        let config = RendezvousConfig::from_env().map_err(|e| backend(e.to_string()))?;
        NcclComm::from_rendezvous(&config, RENDEZVOUS_TIMEOUT)
    }

    /// Rank `config.rank` of `config.world_size` processes, on device `config.local_rank`. Opens
    /// the device first, then meets the other processes (rank 0 makes the unique id and the
    /// rendezvous hands it out), then makes the communicator.
    pub fn from_rendezvous(config: &RendezvousConfig, timeout: Duration) -> Result<NcclComm, CommError> {
        let comm_timeout = timeout_from_env()?;
        check_device(config.local_rank, &format!("LOCAL_RANK={}", config.local_rank))?;
        nccl_version()?;
        let (stream, done) = open_device(config.local_rank)?;
        let id = if config.rank == 0 { Some(new_id()?) } else { None };
        let payload = id.map(|id| id.internal().iter().map(|c| c.to_ne_bytes()[0]).collect::<Vec<u8>>());
        let received =
            rendezvous(config, || payload.unwrap_or_default(), timeout).map_err(|e| backend(e.to_string()))?;
        let bytes: [u8; ID_BYTES] = received.as_slice().try_into().map_err(|_| {
            backend(format!("the rendezvous handed out {} bytes, not a {ID_BYTES}-byte NCCL id", received.len()))
        })?;
        let comm = Comm::from_rank(stream.clone(), config.rank, config.world_size, id_from_bytes(&bytes))
            .map_err(|e| nccl_error("making the communicator (ncclCommInitRank)", e))?;
        let members: Arc<[Rank]> = (0..config.world_size).collect();
        Ok(NcclComm::new(comm, stream, done, None, members, config.rank, comm_timeout))
    }

    /// This rank's rank in the world the launcher (or the job) started: the one errors name.
    pub fn world_rank(&self) -> Rank {
        self.members[self.rank]
    }

    /// The CUDA device (ordinal) this rank drives.
    pub fn device(&self) -> usize {
        self.stream.context().ordinal()
    }

    /// The stream every call runs on (for the CUDA backend to order its work with ours).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How long a call waits before it aborts the communicator and fails: from
    /// [`TIMEOUT_VAR`](super::TIMEOUT_VAR), or [`DEFAULT_TIMEOUT`](super::DEFAULT_TIMEOUT), far
    /// longer than any save, as NCCL cannot tell a slow rank from a dead one. Communicators split
    /// from this one afterwards inherit it.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Device memory held by the staging buffers (bytes), for the memory ledger's communication
    /// buffers.
    pub fn staging_bytes(&self) -> usize {
        let Some(e) = &self.endpoint else { return 0 };
        [&e.input, &e.output].iter().map(|b| b.as_ref().map_or(0, |b| b.num_bytes())).sum()
    }

    /// Why this communicator stopped working, if it did (it was aborted after a failure or a
    /// timeout, and every later call returns this error).
    pub fn broken(&self) -> Option<&CommError> {
        self.broken.as_ref()
    }

    /// Fails at once if this communicator was aborted or another rank failed.
    fn check(&mut self) -> Result<(), CommError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        if let Some(failure) = self.world.as_ref().and_then(|w| w.failure()) {
            return Err(self.abort(failure.to_comm_error()));
        }
        Ok(())
    }

    /// Starts a call: [`NcclComm::check`], then counts it (with zero bytes so far, as thread
    /// ranks do: readers can index the maps by every collective they called).
    fn enter(&mut self, collective: Collective) -> Result<(), CommError> {
        self.check()?;
        *self.stats.calls.entry(collective).or_default() += 1;
        self.stats.sent.entry(collective).or_default();
        self.stats.received.entry(collective).or_default();
        Ok(())
    }

    /// Counts the values a call sent and received (the ring's, see the module doc).
    fn count(&mut self, collective: Collective, (sent, received): (usize, usize)) {
        let bytes = |values: usize| (values * size_of::<f32>()) as u64;
        *self.stats.sent.entry(collective).or_default() += bytes(sent);
        *self.stats.received.entry(collective).or_default() += bytes(received);
    }

    /// Aborts the NCCL communicator (ending any of its kernels still running) and keeps `error`
    /// as the answer to every later call.
    fn abort(&mut self, error: CommError) -> CommError {
        self.broken = Some(error.clone());
        if let Some(endpoint) = self.endpoint.take() {
            discard(endpoint);
        }
        error
    }

    /// Puts one call's work on the stream (`enqueue`: the host -> device copies and the NCCL
    /// call), then waits for it. Any error aborts the communicator: after a failed NCCL call,
    /// the ranks no longer agree on what comes next.
    fn submit(
        &mut self,
        collective: Collective,
        peer: Option<Rank>,
        enqueue: impl FnOnce(&Comm, &mut Staging<'_>) -> Result<(), CommError>,
    ) -> Result<(), CommError> {
        let Some(endpoint) = self.endpoint.as_mut() else {
            return Err(self.broken.clone().unwrap_or_else(|| backend("the communicator was aborted")));
        };
        let queued =
            self.stream.context().bind_to_thread().map_err(|e| cuda_error("binding the context", e)).and_then(|()| {
                let Endpoint { comm, input, output } = endpoint;
                enqueue(comm, &mut Staging { stream: &self.stream, input, output })
            });
        let recorded = queued.and_then(|()| self.done.record(&self.stream).map_err(|e| cuda_error("recording", e)));
        match recorded {
            Ok(()) => self.wait(collective, peer),
            Err(e) => Err(self.abort(e)),
        }
    }

    /// Polls the stream until the call's work is done, another rank failed, or the timeout.
    fn wait(&mut self, collective: Collective, peer: Option<Rank>) -> Result<(), CommError> {
        let start = Instant::now();
        let mut pause = Duration::from_micros(20);
        for poll in 0u32.. {
            match self.done.try_is_complete() {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => return Err(self.abort(cuda_error(&format!("running {collective:?}"), e))),
            }
            if let Some(failure) = self.world.as_ref().and_then(|w| w.failure()) {
                return Err(self.abort(failure.to_comm_error()));
            }
            if start.elapsed() >= self.timeout {
                let error = self.timeout_error(collective, peer);
                return Err(self.abort(error));
            }
            // Yield first (a small message completes in microseconds), then back off.
            if poll < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(pause);
                pause = (pause * 2).min(MAX_POLL_PAUSE);
            }
        }
        // Errors that cudarc recorded instead of returning (in its stream-ordering events).
        self.stream.context().check_err().map_err(|e| self.abort(cuda_error(&format!("running {collective:?}"), e)))
    }

    fn timeout_error(&self, collective: Collective, peer: Option<Rank>) -> CommError {
        let seconds = self.timeout.as_secs();
        match peer {
            Some(peer) => CommError::Timeout { collective, peer: self.members[peer], seconds },
            None => backend(format!(
                "{collective:?} did not complete within {seconds} s: a rank of world ranks {:?} did not \
                 join it (NCCL does not say which); the communicator was aborted",
                self.members
            )),
        }
    }

    /// Copies the first `out.len()` values of a staging buffer to the host, after the call that
    /// wrote them has completed.
    fn download(&mut self, output: bool, out: &mut [f32]) -> Result<(), CommError> {
        let Some(endpoint) = &self.endpoint else {
            return Err(self.broken.clone().unwrap_or_else(|| backend("the communicator was aborted")));
        };
        let slot = if output { &endpoint.output } else { &endpoint.input };
        let Some(src) = slot.as_ref().filter(|s| s.len() >= out.len()) else {
            return Err(backend("internal error: no staging buffer to copy back from"));
        };
        let copied = self.stream.memcpy_dtoh(&src.slice(..out.len()), out);
        let synced = copied.and_then(|()| self.stream.synchronize());
        synced.map_err(|e| self.abort(cuda_error("copying the result to the host", e)))
    }

    fn invalid(collective: Collective, reason: String) -> CommError {
        CommError::InvalidArgument { collective, reason }
    }

    fn check_in_group(&self, peer: Rank, collective: Collective) -> Result<(), CommError> {
        let n = self.world_size();
        if peer >= n {
            return Err(Self::invalid(collective, format!("rank {peer} is not in a group of {n}")));
        }
        Ok(())
    }

    fn check_peer(&self, peer: Rank, collective: Collective) -> Result<(), CommError> {
        self.check_in_group(peer, collective)?;
        if peer == self.rank {
            let reason = format!("rank {peer} cannot send to itself: a blocking NCCL send waits for its receive");
            return Err(Self::invalid(collective, reason));
        }
        Ok(())
    }

    /// Point to point on this communicator, uncounted: how [`NcclComm::split_group`] sets up,
    /// not traffic of the caller's.
    fn send_uncounted(&mut self, values: &[f32], to: Rank) -> Result<(), CommError> {
        self.submit(Collective::Split, Some(to), |comm, staging| {
            let buf = staging.upload_input(values)?;
            comm.send(&buf.slice(..values.len()), to as i32).map_err(|e| nccl_error("running ncclSend", e))
        })
    }

    fn recv_uncounted(&mut self, values: &mut [f32], from: Rank) -> Result<(), CommError> {
        let len = values.len();
        self.submit(Collective::Split, Some(from), |comm, staging| {
            let buf = staging.grow_input(len)?;
            let done = comm.recv(&mut buf.slice_mut(..len), from as i32);
            done.map(|_| ()).map_err(|e| nccl_error("running ncclRecv", e))
        })?;
        self.download(false, values)
    }

    /// A communicator over the sub-group `ranks` (ranks of `self`, in the order of their new
    /// ranks). Every member calls it with the same list; non-members do not call it.
    ///
    /// cudarc has no safe `ncclCommSplit` for recent CUDA versions, so the group makes a
    /// communicator of its own from a unique id of its own, exchanged point to point over `self`
    /// (so non-members take no part), the same way within a process and across nodes:
    /// 1. every other member tells the group's rank 0 that it is ready;
    /// 2. rank 0, once all are, makes the id and sends it to each;
    /// 3. every member calls `ncclCommInitRank`.
    ///
    /// Step 1 is there because `ncclCommInitRank` waits forever for a member that failed: every
    /// fallible step comes before it, and a member that fails there leaves the others in calls
    /// that end (another rank's failure, or the timeout). The new communicator shares this one's
    /// device and stream, and counts its own bytes.
    pub fn split_group(&mut self, ranks: &[Rank]) -> Result<NcclComm, CommError> {
        self.check()?;
        let n = self.world_size();
        let invalid = |reason: String| Self::invalid(Collective::Split, reason);
        if let Some(&bad) = ranks.iter().find(|&&r| r >= n) {
            return Err(invalid(format!("rank {bad} is not in this group of {n} ranks")));
        }
        if let Some(i) = (1..ranks.len()).find(|&i| ranks[..i].contains(&ranks[i])) {
            return Err(invalid(format!("rank {} is listed twice in {ranks:?}", ranks[i])));
        }
        let Some(new_rank) = ranks.iter().position(|&r| r == self.rank) else {
            return Err(invalid(format!("rank {} called split but is not in {ranks:?}", self.rank)));
        };
        let ctx = self.stream.context().clone();
        ctx.bind_to_thread().map_err(|e| cuda_error("binding the context", e))?;
        let done = ctx.new_event(None).map_err(|e| cuda_error("creating an event", e))?;
        let mut id = [0.0; ID_VALUES];
        if new_rank == 0 {
            for &member in &ranks[1..] {
                self.recv_uncounted(&mut [0.0], member)?;
            }
            id = pack_id(&new_id()?);
            for &member in &ranks[1..] {
                self.send_uncounted(&id, member)?;
            }
        } else {
            self.send_uncounted(&[1.0], ranks[0])?;
            self.recv_uncounted(&mut id, ranks[0])?;
        }
        ctx.bind_to_thread().map_err(|e| cuda_error("binding the context", e))?;
        let comm = Comm::from_rank(self.stream.clone(), new_rank, ranks.len(), unpack_id(&id))
            .map_err(|e| nccl_error("making the sub-group's communicator (ncclCommInitRank)", e))?;
        let members: Arc<[Rank]> = ranks.iter().map(|&r| self.members[r]).collect();
        let (stream, world) = (self.stream.clone(), self.world.clone());
        Ok(NcclComm::new(comm, stream, done, world, members, new_rank, self.timeout))
    }
}

/// The staging buffers of one call, and the stream their copies go on.
struct Staging<'a> {
    stream: &'a Arc<CudaStream>,
    input: &'a mut Option<CudaSlice<f32>>,
    output: &'a mut Option<CudaSlice<f32>>,
}

/// `slot`'s buffer, replaced by one of `len` values if it holds fewer: buffers only grow, so a
/// loop of calls of the same sizes allocates once.
fn grow<'s>(
    stream: &Arc<CudaStream>,
    slot: &'s mut Option<CudaSlice<f32>>,
    len: usize,
) -> Result<&'s mut CudaSlice<f32>, CommError> {
    if slot.as_ref().is_none_or(|b| b.len() < len) {
        *slot = None; // free the old buffer before allocating the larger one
        let bytes = len * size_of::<f32>();
        *slot = Some(stream.alloc_zeros(len).map_err(|e| cuda_error(&format!("allocating {bytes} bytes"), e))?);
    }
    slot.as_mut().ok_or_else(|| backend("internal error: staging buffer missing"))
}

fn upload<'s>(
    stream: &Arc<CudaStream>,
    slot: &'s mut Option<CudaSlice<f32>>,
    data: &[f32],
) -> Result<&'s mut CudaSlice<f32>, CommError> {
    let buf = grow(stream, slot, data.len())?;
    stream.memcpy_htod(data, buf).map_err(|e| cuda_error("copying to the device", e))?;
    Ok(buf)
}

impl Staging<'_> {
    fn grow_input(&mut self, len: usize) -> Result<&mut CudaSlice<f32>, CommError> {
        grow(self.stream, self.input, len)
    }

    fn upload_input(&mut self, data: &[f32]) -> Result<&mut CudaSlice<f32>, CommError> {
        upload(self.stream, self.input, data)
    }

    /// Uploads `data` into `input` and makes room for `len` values in `output`.
    fn upload_with_output(
        &mut self,
        data: &[f32],
        len: usize,
    ) -> Result<(&CudaSlice<f32>, &mut CudaSlice<f32>), CommError> {
        let output = grow(self.stream, self.output, len)?;
        let input = upload(self.stream, self.input, data)?;
        Ok((input, output))
    }
}

/// Runs `calls` between ncclGroupStart and ncclGroupEnd: NCCL starts the operations queued in
/// between together, at the end, so a send and a receive of one group never wait for each other.
fn group(calls: impl FnOnce() -> Result<(), NcclError>) -> Result<(), NcclError> {
    cudarc::nccl::result::group_start()?;
    let queued = calls();
    // Every start needs its end, also after a failed call.
    let ended = cudarc::nccl::result::group_end();
    queued.and(ended.map(|_| ()))
}

fn nccl_op(op: ReduceOp) -> cudarc::nccl::ReduceOp {
    match op {
        ReduceOp::Sum => cudarc::nccl::ReduceOp::Sum,
        ReduceOp::Avg => cudarc::nccl::ReduceOp::Avg,
        ReduceOp::Max => cudarc::nccl::ReduceOp::Max,
    }
}

/// The values rank `r` of `n` sends and receives in the ring all-reduce of `len` values
/// ([`super::ring`]): every chunk but one in each half, and the chunks differ by at most one
/// value when n does not divide `len`.
fn ring_all_reduce_values(len: usize, n: usize, r: Rank) -> (usize, usize) {
    if n < 2 {
        return (0, 0);
    }
    let c = |i: usize| super::ring::chunk(len, n, i % n).len();
    // Reduce-scatter sends every chunk but r and receives every chunk but r - 1; all-gather
    // sends every chunk but r + 1 and receives every chunk but r.
    (2 * len - c(r) - c(r + 1), 2 * len - c(r + n - 1) - c(r))
}

/// The chain broadcast's values for rank `r` of `n`: the root only sends, the last rank of the
/// chain only receives.
fn ring_broadcast_values(len: usize, n: usize, r: Rank, root: Rank) -> (usize, usize) {
    let place = (r + n - root) % n;
    (if place + 1 < n { len } else { 0 }, if place > 0 { len } else { 0 })
}

impl Communicator for NcclComm {
    fn rank(&self) -> Rank {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.members.len()
    }

    // ANCHOR: all_reduce
    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        let collective = Collective::AllReduce;
        self.enter(collective)?;
        let n = buf.len();
        if n > 0 {
            // Host -> device, the all-reduce in place on the device, device -> host.
            self.submit(collective, None, |comm, staging| {
                let dev = staging.upload_input(buf)?;
                let done = comm.all_reduce_in_place(&mut dev.slice_mut(..n), &nccl_op(op));
                done.map(|_| ()).map_err(|e| nccl_error("running ncclAllReduce", e))
            })?;
            self.download(false, buf)?;
        }
        self.count(collective, ring_all_reduce_values(n, self.world_size(), self.rank));
        Ok(())
    }
    // ANCHOR_END: all_reduce

    fn reduce_scatter(&mut self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        let collective = Collective::ReduceScatter;
        self.enter(collective)?;
        let (n, m) = (self.world_size(), output.len());
        if input.len() != n * m {
            let reason = format!("input has {} values, not {n} ranks x {m} output values", input.len());
            return Err(Self::invalid(collective, reason));
        }
        if m > 0 {
            self.submit(collective, None, |comm, staging| {
                let (src, dst) = staging.upload_with_output(input, m)?;
                let done = comm.reduce_scatter(&src.slice(..n * m), &mut dst.slice_mut(..m), &nccl_op(op));
                done.map(|_| ()).map_err(|e| nccl_error("running ncclReduceScatter", e))
            })?;
            self.download(true, output)?;
        }
        self.count(collective, ((n - 1) * m, (n - 1) * m));
        Ok(())
    }

    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        let collective = Collective::AllGather;
        self.enter(collective)?;
        let (n, m) = (self.world_size(), input.len());
        if output.len() != n * m {
            let reason = format!("output has {} values, not {n} ranks x {m} input values", output.len());
            return Err(Self::invalid(collective, reason));
        }
        if m > 0 {
            self.submit(collective, None, |comm, staging| {
                let (src, dst) = staging.upload_with_output(input, n * m)?;
                let done = comm.all_gather(&src.slice(..m), &mut dst.slice_mut(..n * m));
                done.map(|_| ()).map_err(|e| nccl_error("running ncclAllGather", e))
            })?;
            self.download(true, output)?;
        }
        self.count(collective, ((n - 1) * m, (n - 1) * m));
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [f32], root: Rank) -> Result<(), CommError> {
        let collective = Collective::Broadcast;
        self.enter(collective)?;
        let n = self.world_size();
        if root >= n {
            return Err(Self::invalid(collective, format!("root {root} is not a rank of a group of {n}")));
        }
        let len = buf.len();
        if len > 0 {
            let is_root = self.rank == root;
            self.submit(collective, None, |comm, staging| {
                // Only the root's values matter: the others' buffers are overwritten.
                let dev = if is_root { staging.upload_input(buf)? } else { staging.grow_input(len)? };
                let done = comm.broadcast_in_place(&mut dev.slice_mut(..len), root as i32);
                done.map(|_| ()).map_err(|e| nccl_error("running ncclBroadcast", e))
            })?;
            if !is_root {
                self.download(false, buf)?;
            }
        }
        self.count(collective, ring_broadcast_values(len, n, self.rank, root));
        Ok(())
    }

    fn send(&mut self, buf: &[f32], to: Rank) -> Result<(), CommError> {
        let collective = Collective::SendRecv;
        self.check_peer(to, collective)?;
        self.enter(collective)?;
        if !buf.is_empty() {
            self.submit(collective, Some(to), |comm, staging| {
                let dev = staging.upload_input(buf)?;
                comm.send(&dev.slice(..buf.len()), to as i32).map_err(|e| nccl_error("running ncclSend", e))
            })?;
        }
        self.count(collective, (buf.len(), 0));
        Ok(())
    }

    fn recv(&mut self, buf: &mut [f32], from: Rank) -> Result<(), CommError> {
        let collective = Collective::SendRecv;
        self.check_peer(from, collective)?;
        self.enter(collective)?;
        let len = buf.len();
        if len > 0 {
            self.submit(collective, Some(from), |comm, staging| {
                let dev = staging.grow_input(len)?;
                let done = comm.recv(&mut dev.slice_mut(..len), from as i32);
                done.map(|_| ()).map_err(|e| nccl_error("running ncclRecv", e))
            })?;
            self.download(false, buf)?;
        }
        self.count(collective, (0, len));
        Ok(())
    }

    /// One NCCL group (ncclGroupStart, ncclSend, ncclRecv, ncclGroupEnd): NCCL starts both
    /// halves together, so two ranks that send to each other do not wait on each other. Empty
    /// halves are left out (their partner's half is empty too).
    fn sendrecv(&mut self, send: &[f32], to: Rank, recv: &mut [f32], from: Rank) -> Result<(), CommError> {
        let collective = Collective::SendRecv;
        self.check_in_group(to, collective)?;
        self.check_in_group(from, collective)?;
        self.enter(collective)?;
        let (sent, received) = (send.len(), recv.len());
        if sent + received > 0 {
            self.submit(collective, Some(from), |comm, staging| {
                let Staging { stream, input, output } = staging;
                let src = if sent > 0 { Some(upload(stream, input, send)?) } else { None };
                let dst = if received > 0 { Some(grow(stream, output, received)?) } else { None };
                let queued = group(|| {
                    if let Some(src) = src {
                        comm.send(&src.slice(..sent), to as i32)?;
                    }
                    if let Some(dst) = dst {
                        comm.recv(&mut dst.slice_mut(..received), from as i32)?;
                    }
                    Ok(())
                });
                queued.map_err(|e| nccl_error("running ncclSend and ncclRecv in a group", e))
            })?;
            if received > 0 {
                self.download(true, recv)?;
            }
        }
        self.count(collective, (sent, received));
        Ok(())
    }

    /// An all-reduce of one value: it completes on a rank only once every rank has called it.
    /// Counted as no bytes, as for thread ranks: a barrier carries no data of the caller's.
    fn barrier(&mut self) -> Result<(), CommError> {
        let collective = Collective::Barrier;
        self.enter(collective)?;
        self.submit(collective, None, |comm, staging| {
            let dev = staging.upload_input(&[0.0])?;
            let done = comm.all_reduce_in_place(&mut dev.slice_mut(..1), &cudarc::nccl::ReduceOp::Sum);
            done.map(|_| ()).map_err(|e| nccl_error("running the barrier's ncclAllReduce", e))
        })
    }

    fn split(&mut self, ranks: &[Rank]) -> Result<Box<dyn Communicator>, CommError> {
        Ok(Box::new(self.split_group(ranks)?))
    }

    fn stats(&self) -> CommStats {
        self.stats.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_byte_formulas_match_what_thread_ranks_measure() {
        for n in 1..=5 {
            for len in [0, 1, 2, 7, 100, 1003] {
                let measured = thread::launch(n, move |mut comm| {
                    let mut buf = vec![1.0; len];
                    comm.all_reduce(&mut buf, ReduceOp::Sum)?;
                    for root in 0..n {
                        comm.broadcast(&mut buf, root)?;
                    }
                    Ok::<_, CommError>(comm.stats())
                })
                .unwrap();
                for (r, stats) in measured.iter().enumerate() {
                    let bytes = |(s, v): (usize, usize)| ((s * 4) as u64, (v * 4) as u64);
                    let (mut sent, mut received) = bytes(ring_all_reduce_values(len, n, r));
                    assert_eq!(stats.sent[&Collective::AllReduce], sent, "all-reduce sent, n={n} len={len} r={r}");
                    assert_eq!(stats.received[&Collective::AllReduce], received, "all-reduce received");
                    (sent, received) = (0, 0);
                    for root in 0..n {
                        let (s, v) = bytes(ring_broadcast_values(len, n, r, root));
                        (sent, received) = (sent + s, received + v);
                    }
                    assert_eq!(stats.sent[&Collective::Broadcast], sent, "broadcast sent, n={n} len={len} r={r}");
                    assert_eq!(stats.received[&Collective::Broadcast], received, "broadcast received");
                }
            }
        }
    }

    #[test]
    fn a_unique_id_survives_packing_and_a_broadcast_bit_for_bit() {
        // Bytes 0xff make NaN patterns: copies must keep them, as they do.
        let bytes: [u8; ID_BYTES] = std::array::from_fn(|i| if i % 9 == 0 { 0xff } else { (i * 37 % 256) as u8 });
        let id = id_from_bytes(&bytes);
        let received = thread::launch(3, move |mut comm| {
            let mut values = if comm.rank() == 0 { pack_id(&id) } else { [0.0; ID_VALUES] };
            comm.broadcast(&mut values, 0)?;
            Ok::<_, CommError>(*unpack_id(&values).internal())
        })
        .unwrap();
        for internal in received {
            assert_eq!(internal, *id.internal());
        }
    }

    #[test]
    fn nccl_errors_read_as_nccl_says_them() {
        let e = nccl_error("running ncclAllReduce", NcclError(ncclResult_t::ncclRemoteError));
        assert_eq!(
            e.to_string(),
            "NCCL error while running ncclAllReduce: ncclRemoteError (6): remote process exited or there was a network error"
        );
        assert!(nccl_error_message(ncclResult_t::ncclInvalidArgument).starts_with("invalid argument"));
    }

    #[test]
    fn nccl_comm_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<NcclComm>();
    }
}
