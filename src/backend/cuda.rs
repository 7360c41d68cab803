//! The NVIDIA GPU backend: the same op chain as `ops::apply_chain`, on the device.
//!
//! Decoding, the default/mini add, the BAT `+ B_i` and every rounding are NVRTC-compiled kernels
//! (`kernels.cu`: f32 arithmetic, round to nearest even, the same integer bf16 rounding as the
//! CPU); the BAT strip GEMMs are the in-order `strip_gemm` kernel, which sums as PEFT's torch and
//! the CPU do (`ops::BatSums`), or with `BONE_TOOL_GEMM=cublas` cuBLAS strided-batched SGEMMs in
//! pedantic (true f32, no TF32) math mode.
//! libcuda, NVRTC and cuBLAS are loaded at run time (cudarc's dynamic loading): a machine without
//! them gets a clear error, never a crash.

use super::kernel_cache;
use crate::ops::dtype::Float;
use crate::ops::{BatSums, Prepared};
use anyhow::{anyhow, Result};
use cudarc::cublas::{sys as blas_sys, CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PinnedHostSlice, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::Instant;

/// The kernels' CUDA C++ source, compiled at run time by NVRTC (and by the host's C++ compiler in
/// `cuda_on_host`'s tests).
pub const KERNELS: &str = include_str!("kernels.cu");

/// The kernels of [`KERNELS`], by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Decode,
    Encode,
    Periodic,
    PeriodicFused,
    PeriodicFusedX4,
    BatMergePost,
    BatUnmergePre,
    RoundAll,
    StripGemm,
}

impl Kernel {
    pub const ALL: [Kernel; 9] = [
        Kernel::Decode,
        Kernel::Encode,
        Kernel::Periodic,
        Kernel::PeriodicFused,
        Kernel::PeriodicFusedX4,
        Kernel::BatMergePost,
        Kernel::BatUnmergePre,
        Kernel::RoundAll,
        Kernel::StripGemm,
    ];

    /// Its name in [`KERNELS`].
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Decode => "decode",
            Kernel::Encode => "encode",
            Kernel::Periodic => "periodic",
            Kernel::PeriodicFused => "periodic_fused",
            Kernel::PeriodicFusedX4 => "periodic_fused_x4",
            Kernel::BatMergePost => "bat_merge_post",
            Kernel::BatUnmergePre => "bat_unmerge_pre",
            Kernel::RoundAll => "round_all",
            Kernel::StripGemm => "strip_gemm",
        }
    }
}

pub struct Cuda {
    /// What lives on the GPU; None once released ([`Cuda::release`]).
    gpu: RwLock<Option<Gpu>>,
    name: String,
    /// Nanoseconds spent copying to the device, in kernels (and the blocks' uploads), copying back,
    /// and (on the host) copying into and out of the lanes' page-locked buffers.
    phases: [AtomicU64; 5],
    /// Seconds each step of starting took (the self-check is added by the caller).
    pub startup: Vec<(&'static str, f64)>,
    /// How many lanes `gpu` has (0: everything runs synchronously on its stream).
    n_lanes: usize,
    next_lane: AtomicUsize,
    /// The thread that frees the GPU once released; joined when this is dropped.
    releasing: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The context and everything made in it.
struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// cuBLAS on `stream`, for the synchronous path when cuBLAS does BAT's GEMMs
    /// (`BONE_TOOL_GEMM=cublas`): opened with the device then, else on first use (the kernel
    /// benchmark); loading cuBLAS costs 0.1-0.2 s that no other run need pay.
    blas: std::sync::OnceLock<CudaBlas>,
    /// Indexed by [`Kernel`].
    k: Vec<CudaFunction>,
    /// The streams pieces are queued on (empty: everything runs synchronously on `stream`).
    lanes: Vec<Mutex<Lane>>,
}

/// The device buffers one piece runs in.
struct Buffers<'a> {
    d_in: &'a CudaSlice<u8>,
    w: &'a mut CudaSlice<f32>,
    tmp: &'a mut CudaSlice<f32>,
    d_out: &'a mut CudaSlice<u8>,
}

/// One stream with its page-locked staging buffers (cached, not write-combined: the host reads the
/// results back) and device buffers, reused piece after piece (and its own cuBLAS handle when
/// cuBLAS does the GEMMs).
struct Lane {
    stream: Arc<CudaStream>,
    /// Created with the lane when cuBLAS is to do the device's GEMMs, else on the lane's first
    /// cuBLAS GEMM (none with the in-order kernel).
    blas: Option<CudaBlas>,
    bufs: Option<LaneBuffers>,
    /// Recorded before the copy in, after it, after the kernels, after the copy back.
    marks: [CudaEvent; 4],
    /// Bytes of the result in flight, until collected.
    pending: Option<usize>,
}

struct LaneBuffers {
    /// Bytes the byte buffers hold, and elements the f32 ones hold.
    bytes: usize,
    elems: usize,
    pin_in: PinnedHostSlice<u8>,
    pin_out: PinnedHostSlice<u8>,
    d_in: CudaSlice<u8>,
    d_out: CudaSlice<u8>,
    w: CudaSlice<f32>,
    tmp: CudaSlice<f32>,
}

impl Lane {
    fn new(ctx: &Arc<CudaContext>, cublas: bool) -> Result<Lane> {
        let stream = ctx.new_stream().map_err(e("new stream"))?;
        let blas = if cublas { Some(new_blas(&stream)?) } else { None };
        let ev = || ctx.new_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC)).map_err(e("new event"));
        Ok(Lane { stream, blas, bufs: None, marks: [ev()?, ev()?, ev()?, ev()?], pending: None })
    }

    /// Make the buffers hold a piece of `bytes` bytes and `elems` elements, and at least any whole
    /// piece of the pipeline ([`lane_sizes`]), so that the first allocation (at the device's start)
    /// serves the whole run: growing means a synchronize and page-locking the staging buffers anew.
    fn reserve(&mut self, ctx: &Arc<CudaContext>, bytes: usize, elems: usize) -> Result<()> {
        if self.bufs.as_ref().is_some_and(|b| b.bytes >= bytes && b.elems >= elems) {
            return Ok(());
        }
        self.stream.synchronize().map_err(e("synchronize"))?;
        self.bufs = None;
        let (bytes, elems) = lane_sizes(bytes, elems, crate::execute::piece_bytes());
        let s = &self.stream;
        // SAFETY: the staging buffers are written before they are read.
        let pin = || unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes, 0) }.map_err(e("page-locked allocation"));
        self.bufs = Some(LaneBuffers {
            bytes,
            elems,
            pin_in: pin()?,
            pin_out: pin()?,
            d_in: s.alloc_zeros(bytes).map_err(e("allocation"))?,
            d_out: s.alloc_zeros(bytes).map_err(e("allocation"))?,
            w: s.alloc_zeros(elems).map_err(e("allocation"))?,
            tmp: s.alloc_zeros(elems).map_err(e("allocation"))?,
        });
        Ok(())
    }
}

/// The sizes a lane's buffers get for a piece of `bytes` bytes and `elems` elements when the
/// pipeline's pieces are at most `piece` bytes: whole pieces of every dtype fit, the 2-byte ones
/// having the most elements. (Sized by f32 elements, as before, a 16 MB bf16 piece did not fit
/// the first allocation: every bf16 run grew its lanes at its first GPU piece.)
pub(crate) fn lane_sizes(bytes: usize, elems: usize, piece: usize) -> (usize, usize) {
    (bytes.max(piece), elems.max(piece / 2))
}

/// A CUDA error, with what was being done.
fn e(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> anyhow::Error {
    move |err| anyhow!("CUDA {what}: {err:?}")
}

/// A cuBLAS handle on stream `s`, in pedantic math.
fn new_blas(s: &Arc<CudaStream>) -> Result<CudaBlas> {
    if !library(Library::Cublas) {
        return Err(anyhow!("cuBLAS (libcublas) was not found"));
    }
    let blas = CudaBlas::new(s.clone()).map_err(|e| anyhow!("cannot start cuBLAS: {e:?}"))?;
    pedantic(&blas)?;
    Ok(blas)
}

/// True f32 GEMMs: no TF32, whatever NVIDIA_TF32_OVERRIDE or the defaults say.
fn pedantic(blas: &CudaBlas) -> Result<()> {
    // SAFETY: a valid handle from CudaBlas::new.
    unsafe { blas_sys::cublasSetMathMode(*blas.handle(), blas_sys::cublasMath_t::CUBLAS_PEDANTIC_MATH) }
        .result()
        .map_err(|e| anyhow!("cannot set cuBLAS math mode: {e:?}"))
}

/// The shared libraries the GPU backend loads at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Library {
    /// libcuda, the driver's
    Driver,
    Nvrtc,
    /// libcublas (which loads the 500 MB libcublasLt)
    Cublas,
}

/// Whether `lib` can be loaded, by the names cudarc looks for. The first call loads it and keeps it
/// loaded, so that cudarc's own loading at the library's first use finds it there at no cost.
/// (cudarc's `is_culib_present` unloads what it loaded: the load that followed paid the whole
/// `dlopen` again, 80-90 ms for cuBLAS on the 2-core machine, 10 ms for NVRTC.)
pub fn library(lib: Library) -> bool {
    static LOADED: [std::sync::OnceLock<Option<libloading::Library>>; 3] =
        [std::sync::OnceLock::new(), std::sync::OnceLock::new(), std::sync::OnceLock::new()];
    let names: &[&str] = match lib {
        Library::Driver => &["cuda", "nvcuda"],
        Library::Nvrtc => &["nvrtc"],
        Library::Cublas => &["cublas"],
    };
    LOADED[lib as usize]
        .get_or_init(|| {
            names.iter().flat_map(|n| cudarc::get_lib_name_candidates(n)).find_map(|name| {
                // SAFETY: loading runs the library's initialisers, as cudarc's own loading of the
                // same file by the same name does.
                unsafe { libloading::Library::new(name) }.ok()
            })
        })
        .is_some()
}

fn dt_code(d: Float) -> i32 {
    match d {
        Float::F32 => 0,
        Float::F16 => 1,
        Float::BF16 => 2,
    }
}

/// How the one-pass add (`periodic_fused`) is launched: at most `max_bytes` bytes per access (16,
/// 8, or 0: one element at a time), `unroll` groups a thread has in flight (1 or 4), and at most
/// `grid_rows` rows of blocks (the grid's y axis; each thread strides over the rows beyond).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fused {
    pub max_bytes: usize,
    pub unroll: usize,
    pub grid_rows: usize,
}

impl Fused {
    /// What `--device cuda` uses: 16 bytes, one group a thread, a row of blocks per row (up to the
    /// grid's 65535). `BONE_TOOL_ACCESS_BYTES=8` (or 0), `BONE_TOOL_UNROLL=4` and
    /// `BONE_TOOL_GRID_ROWS=N` change it, to compare end to end on a GPU.
    pub fn configured() -> Fused {
        static F: std::sync::OnceLock<Fused> = std::sync::OnceLock::new();
        *F.get_or_init(|| {
            let var = |name: &str, default: usize| crate::env_setting(name).unwrap_or(default);
            Fused {
                max_bytes: var("BONE_TOOL_ACCESS_BYTES", 16),
                unroll: if var("BONE_TOOL_UNROLL", 1) == 4 { 4 } else { 1 },
                grid_rows: var("BONE_TOOL_GRID_ROWS", Fused::ALL_ROWS).clamp(1, Fused::ALL_ROWS),
            }
        })
    }

    /// No cap on the grid's rows of blocks beyond the grid's own.
    pub const ALL_ROWS: usize = GRID_Y_MAX;

    /// Bytes per access for rows of `cols` elements of `d`: the widest allowed of 16 and 8 whose
    /// groups every row holds whole (so that every access is aligned), else 0.
    pub fn access_bytes(self, d: Float, cols: usize) -> usize {
        [16, 8].into_iter().find(|&b| b <= self.max_bytes && cols.is_multiple_of(b / d.size())).unwrap_or(0)
    }

    /// The kernel: `periodic_fused`, or `periodic_fused_x4` for four groups a thread.
    pub(crate) fn kernel(self) -> Kernel {
        if self.unroll == 4 {
            Kernel::PeriodicFusedX4
        } else {
            Kernel::PeriodicFused
        }
    }

    /// The launch of the one-pass add `out = in + sign * e` over a [rows, cols] weight of `d` with
    /// residues mod `r`: its kernel, grid and arguments (`bufs`: in, out, e).
    pub(crate) fn launch(
        self,
        d: Float,
        rows: usize,
        cols: usize,
        r: usize,
        sign: f32,
        [input, out, e]: [Arg; 3],
    ) -> (Kernel, LaunchConfig, [Arg; 9]) {
        let vec = self.access_bytes(d, cols) as i32;
        let args = [
            input,
            out,
            e,
            Arg::U64(rows as u64),
            Arg::U64(cols as u64),
            Arg::I32(r as i32),
            Arg::F32(sign),
            Arg::I32(dt_code(d)),
            Arg::I32(vec),
        ];
        (self.kernel(), self.grid(d, rows, cols), args)
    }

    /// The grid: a thread per `unroll` groups of a row (per element when one at a time), for at
    /// most `grid_rows` rows at once.
    pub(crate) fn grid(self, d: Float, rows: usize, cols: usize) -> LaunchConfig {
        let rows = rows.min(self.grid_rows);
        match self.access_bytes(d, cols) {
            0 => grid_2d(rows, cols),
            bytes => grid_2d(rows, (cols / (bytes / d.size())).div_ceil(self.unroll)),
        }
    }
}

/// How the GPU does BAT's strip GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StripGemm {
    /// The `strip_gemm` kernel: every element summed in order (one fused multiply-add per product
    /// from r = 8, a rounded product then a rounded add below), as PEFT and the CPU sum it, so that
    /// BAT gives the CPU's bytes (where
    /// [`crate::ops::gemm_is_in_order`]); and no cuBLAS to load and start.
    InOrder,
    /// cuBLAS's strided-batched SGEMM in pedantic f32 (`BONE_TOOL_GEMM=cublas`): its own order of
    /// summing, so within one unit of the CPU's values rather than its bytes.
    Cublas,
}

impl StripGemm {
    /// What `--device cuda` uses: the in-order kernel unless `BONE_TOOL_GEMM=cublas`.
    pub fn configured() -> StripGemm {
        static G: std::sync::OnceLock<StripGemm> = std::sync::OnceLock::new();
        *G.get_or_init(|| match std::env::var("BONE_TOOL_GEMM").as_deref() {
            Ok("cublas") => StripGemm::Cublas,
            _ => StripGemm::InOrder,
        })
    }

    /// Whether `ops` need cuBLAS: BAT's GEMMs, done by cuBLAS.
    pub fn needs_cublas(self, ops: &[Prepared]) -> bool {
        self == StripGemm::Cublas && super::has_gemm(ops)
    }
}

/// The most blocks a grid has on its y axis (CUDA's limit).
const GRID_Y_MAX: usize = 65_535;

/// For `each_element`: rows on the grid's y axis (grid-stride beyond 65535), columns on x, in
/// blocks of up to 256 threads (fewer, in whole warps, for narrow rows).
pub(crate) fn grid_2d(rows: usize, cols: usize) -> LaunchConfig {
    let threads = cols.next_multiple_of(32).clamp(32, 256);
    let x = cols.div_ceil(threads).clamp(1, 65_535) as u32;
    let y = rows.clamp(1, GRID_Y_MAX) as u32;
    LaunchConfig { grid_dim: (x, y, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }
}

pub(crate) fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

impl Gpu {
    /// cuBLAS on the default stream, opened now if it was not with the device.
    fn blas(&self) -> Result<&CudaBlas> {
        if let Some(b) = self.blas.get() {
            return Ok(b);
        }
        let _ = self.blas.set(new_blas(&self.stream)?);
        Ok(self.blas.get().expect("just set"))
    }

    /// Run [`program`] for the chain on stream `s` (whose cuBLAS handle is `blas`, if cuBLAS does
    /// the chain's GEMMs), queued.
    #[allow(clippy::too_many_arguments)]
    fn run_ops(
        &self,
        s: &Arc<CudaStream>,
        blas: Option<&CudaBlas>,
        bufs: Buffers,
        d: Float,
        rows: usize,
        i: usize,
        row0: usize,
        ops: &[Prepared],
    ) -> Result<()> {
        let x = &mut GpuExec { s, blas, k: &self.k, bufs, ups: vec![] };
        program(x, d, rows, i, row0, ops, Fused::configured(), StripGemm::configured())
    }
}

impl Cuda {
    /// Open device 0; `cublas`: the chains to come have GEMMs (BAT) that cuBLAS is to do
    /// ([`StripGemm::Cublas`]), so it is loaded and started now too.
    pub fn new(cublas: bool) -> Result<Cuda> {
        let mut clock = Instant::now();
        let mut startup = vec![];
        let mut step = |what: &'static str| {
            startup.push((what, clock.elapsed().as_secs_f64()));
            clock = Instant::now();
        };
        if !library(Library::Driver) {
            return Err(anyhow!("the NVIDIA driver library (libcuda) was not found"));
        }
        step("loading libcuda");
        // NVRTC (and cuBLAS, for GEMMs) load on another thread while the driver starts: loading is
        // this process's own CPU work (cuBLAS pulls in the 500 MB cuBLASLt), the driver's start
        // mostly waits on its kernel module.
        let loader = std::thread::spawn(move || {
            let nvrtc = library(Library::Nvrtc);
            if cublas {
                library(Library::Cublas);
            }
            nvrtc
        });
        // cuInit (in device_count) and the context, timed apart: which of the two is the driver's
        // 0.2-0.38 s?
        let n = CudaContext::device_count();
        step("driver (cuInit)");
        let ctx = n.map_err(|e| anyhow!("the CUDA driver reports no device: {e:?}")).and_then(|n| {
            anyhow::ensure!(n >= 1, "no CUDA device");
            CudaContext::new(0).map_err(|e| anyhow!("cannot open CUDA device 0: {e:?}"))
        });
        step("context");
        let nvrtc = loader.join().unwrap_or(false);
        let ctx = ctx?;
        if !nvrtc {
            return Err(anyhow!("NVRTC (libnvrtc) was not found"));
        }
        step(if cublas { "waiting for NVRTC and cuBLAS to load" } else { "waiting for NVRTC to load" });
        let name = ctx.name().unwrap_or_else(|_| "CUDA device 0".into());
        let stream = ctx.default_stream();
        // NVRTC's output, cached between runs (see kernel_cache); one the driver refuses is compiled anew
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers; libnvrtc is loaded (the loader above).
        unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| anyhow!("NVRTC: {e:?}"))?;
        let compile = || {
            cudarc::nvrtc::compile_ptx(KERNELS)
                .map(|p| p.to_src())
                .map_err(|e| anyhow!("NVRTC could not compile the kernels: {e:?}"))
        };
        let load = |text: String| -> Result<Vec<CudaFunction>> {
            let module = ctx.load_module(Ptx::from_src(text)).map_err(|e| anyhow!("cannot load the kernels: {e:?}"))?;
            let f = |name: &str| module.load_function(name).map_err(|e| anyhow!("kernel {name}: {e:?}"));
            Kernel::ALL.iter().map(|k| f(k.name())).collect()
        };
        let cache = kernel_cache::dir();
        let names: Vec<&str> = Kernel::ALL.iter().map(|k| k.name()).collect();
        let ptx = kernel_cache::ptx(cache.as_deref(), KERNELS, (major, minor), &names, compile)?;
        let from_cache = ptx.from_cache;
        let k = match load(ptx.text) {
            Err(_) if from_cache => {
                kernel_cache::forget(cache.as_deref(), KERNELS, (major, minor));
                load(compile()?)?
            }
            other => other?,
        };
        step(if from_cache { "kernels (cached PTX)" } else { "kernels (NVRTC)" });
        let n_lanes = crate::env_setting("BONE_TOOL_CUDA_LANES").unwrap_or(2usize);
        // the default stream's cuBLAS serves the synchronous path: with lanes, each has its own
        // and this one opens only if asked for (the kernel benchmark)
        let blas = std::sync::OnceLock::new();
        if cublas && n_lanes <= 1 {
            let _ = blas.set(new_blas(&stream)?);
        }
        let mut lanes = if n_lanes > 1 {
            (0..n_lanes).map(|_| Lane::new(&ctx, cublas).map(Mutex::new)).collect::<Result<Vec<_>>>()?
        } else {
            vec![]
        };
        step(if cublas { "cuBLAS and lanes" } else { "lanes" });
        // each lane's buffers, for a whole piece, now rather than at its first piece: a step of its
        // own, as page-locking host memory is the driver's slow path
        for lane in &mut lanes {
            lane.get_mut().map_err(|_| anyhow!("a GPU lane was poisoned"))?.reserve(&ctx, 0, 0)?;
        }
        if !lanes.is_empty() {
            step("lane buffers");
        }
        Ok(Cuda {
            n_lanes: lanes.len(),
            gpu: RwLock::new(Some(Gpu { ctx, stream, blas, k, lanes })),
            name,
            phases: Default::default(),
            startup,
            next_lane: AtomicUsize::new(0),
            releasing: Mutex::new(None),
        })
    }

    /// The GPU's state for a call; an error once it was released.
    fn state(&self) -> Result<RwLockReadGuard<'_, Option<Gpu>>> {
        let guard = self.gpu.read().map_err(|_| anyhow!("the GPU's state was poisoned"))?;
        anyhow::ensure!(guard.is_some(), "internal error: the GPU was used after it was released");
        Ok(guard)
    }

    /// Free everything on the GPU (buffers, cuBLAS, streams, kernels, the context) on a thread of
    /// its own, once the work needs it no more: the driver's teardown, which took 0.15-0.2 s at the
    /// H200 machine's process exits, then runs beside the writer's tail and its fsyncs. The name,
    /// the counters and the start-up steps stay; any other call is an error afterwards.
    pub fn release(&self) {
        let Some(gpu) = self.gpu.write().ok().and_then(|mut g| g.take()) else { return };
        let handle = std::thread::spawn(move || {
            // the frees run in the context, as on the thread that used it
            let _ = gpu.ctx.bind_to_thread();
            drop(gpu);
        });
        *self.releasing.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Seconds so far in host-to-device copies, kernels, device-to-host copies, and staging copies.
    pub fn phase_seconds(&self) -> [f64; 5] {
        self.phases.each_ref().map(|a| a.load(Ordering::Relaxed) as f64 * 1e-9)
    }

    fn phase_done(&self, s: &CudaStream, phase: usize, since: &mut Instant) -> Result<()> {
        s.synchronize().map_err(|e| anyhow!("CUDA synchronize: {e:?}"))?;
        self.phases[phase].fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
        *since = Instant::now();
        Ok(())
    }

    /// The GPU version of [`crate::ops::apply_chain`], synchronous, on the default stream with
    /// pageable copies: the one-lane path (`BONE_TOOL_CUDA_LANES=1`).
    #[allow(clippy::too_many_arguments)]
    pub fn apply_chain(
        &self,
        src: &[u8],
        dst: &mut [u8],
        d: Float,
        rows: usize,
        i: usize,
        row0: usize,
        ops: &[Prepared],
    ) -> Result<()> {
        let n = rows * i;
        anyhow::ensure!(src.len() == n * d.size() && dst.len() == src.len(), "apply_chain: byte counts");
        let guard = self.state()?;
        let g = guard.as_ref().expect("state() checks");
        // The device may have been opened on another thread: its context becomes this thread's.
        g.ctx.bind_to_thread().map_err(e("context"))?;
        let s = &g.stream;
        let mut since = Instant::now();
        let d_in: CudaSlice<u8> = s.clone_htod(src).map_err(e("host to device copy"))?;
        self.phase_done(s, 0, &mut since)?;
        let (w_len, tmp_len) = scratch_lens(ops, n);
        let mut w: CudaSlice<f32> = s.alloc_zeros(w_len).map_err(e("allocation"))?;
        let mut tmp: CudaSlice<f32> = s.alloc_zeros(tmp_len).map_err(e("allocation"))?;
        let mut d_out: CudaSlice<u8> = s.alloc_zeros(src.len()).map_err(e("allocation"))?;
        let bufs = Buffers { d_in: &d_in, w: &mut w, tmp: &mut tmp, d_out: &mut d_out };
        let blas = if StripGemm::configured().needs_cublas(ops) { Some(g.blas()?) } else { None };
        g.run_ops(s, blas, bufs, d, rows, i, row0, ops)?;
        self.phase_done(s, 1, &mut since)?;
        s.memcpy_dtoh(&d_out, dst).map_err(e("device to host copy"))?;
        self.phase_done(s, 2, &mut since)?;
        Ok(())
    }

    /// Kernel throughput on this GPU, for the GPU check: the one-pass default/mini add on bf16
    /// (GB/s of bytes read and written, next to a device-to-device copy of the same bytes, which is
    /// about what the memory can do), and the BAT strip GEMMs (GFLOP/s, r = 64).
    pub fn bench_kernels(&self) -> Result<String> {
        let guard = self.state()?;
        let g = guard.as_ref().expect("state() checks");
        let s = &g.stream;
        let (rows, cols, r) = (16_384usize, 16_384usize, 64usize);
        let n = rows * cols;
        let timed = |what: &str, reps: usize, f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
            f()?; // warm-up
            let a = s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(e("event"))?;
            for _ in 0..reps {
                f()?;
            }
            let b = s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(e("event"))?;
            let ms = a.elapsed_ms(&b).map_err(e("event timing"))? as f64 / reps as f64;
            anyhow::ensure!(ms > 0.0, "{what}: no time measured");
            Ok(ms * 1e-3)
        };
        let d_in: CudaSlice<u8> = s.alloc_zeros(n * 2).map_err(e("allocation"))?;
        let mut d_out: CudaSlice<u8> = s.alloc_zeros(n * 2).map_err(e("allocation"))?;
        let et: Vec<f32> = (0..rows * r).map(|k| (k % 97) as f32 * 1e-3).collect();
        let d_et = s.clone_htod(&et).map_err(e("host to device copy"))?;
        let copy = timed("copy", 5, &mut || s.memcpy_dtod(&d_in, &mut d_out).map_err(e("copy")))?;
        let add_bufs = [addr(&d_in, s), addr(&d_out, s), addr(&d_et, s)];
        let add = |f: Fused| {
            let (k, cfg, args) = f.launch(Float::BF16, rows, cols, r, 1.0, add_bufs);
            // SAFETY: the arguments of the one-pass add, for buffers of a [rows, cols] bf16 weight.
            timed("add", 5, &mut || unsafe { launch_kernel(s, &g.k, k, cfg, &args) })
        };
        // every width, one and four groups a thread (the columns hold whole groups of every width);
        // the 16-byte ones also on grids of 1024 and 256 rows of blocks (fewer, longer-lived blocks:
        // 8 or 2 blocks a row here, 132 multiprocessors)
        let all = Fused::ALL_ROWS;
        let mut launches = vec![(16, 1, all), (16, 4, all), (8, 1, all), (8, 4, all), (0, 1, all)];
        launches.extend([(16, 1, 1024), (16, 4, 1024), (16, 1, 256), (16, 4, 256)]);
        let mut adds = vec![];
        for (max_bytes, unroll, grid_rows) in launches {
            let f = Fused { max_bytes, unroll, grid_rows };
            adds.push((f, add(f)?));
        }
        let used = Fused::configured();
        let used = Fused { max_bytes: used.access_bytes(Float::BF16, cols), ..used };
        let used_time = match adds.iter().find(|(f, _)| *f == used) {
            Some(a) => a.1,
            None => add(used)?,
        };
        let fastest = adds.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1)).expect("launches timed");
        let name = |f: Fused| {
            let grid = if f.grid_rows < all { format!(" /{} rows", f.grid_rows) } else { String::new() };
            format!("{}-byte x{}{grid}", f.max_bytes.max(2), f.unroll)
        };
        // the add reads and writes every bf16 value once
        let bytes = (n * 2 * 2) as f64;
        let each: Vec<String> = adds.iter().map(|&(f, t)| format!("{} {:.1}", name(f), bytes / t / 1e9)).collect();
        drop((d_in, d_out, d_et));
        let w: CudaSlice<f32> = s.alloc_zeros(n).map_err(e("allocation"))?;
        let mut out: CudaSlice<f32> = s.alloc_zeros(n).map_err(e("allocation"))?;
        let blocks: CudaSlice<f32> = s.alloc_zeros(rows * r).map_err(e("allocation"))?;
        let cfg = strip_gemm_config(rows, cols, r);
        let mut gemm = |blas: &CudaBlas| {
            // SAFETY: the buffers hold the strips and blocks of a [rows, cols] weight.
            unsafe { blas.gemm_strided_batched(cfg, &blocks, &w, &mut out) }
                .map_err(|e| anyhow!("cuBLAS strided SGEMM: {e:?}"))
        };
        let pedantic_gemm = timed("gemm", 5, &mut || gemm(g.blas()?))?;
        // cuBLAS's default math keeps SGEMM in f32 too (TF32 only when asked for): is pedantic slower?
        let default_blas = CudaBlas::new(s.clone()).map_err(|e| anyhow!("cannot start cuBLAS: {e:?}"))?;
        let default_gemm = timed("gemm", 5, &mut || gemm(&default_blas))?;
        let in_order =
            |m: &CudaSlice<f32>, x: &CudaSlice<f32>, out: &mut CudaSlice<f32>, rows: usize, cols: usize, r: usize| {
                let bufs = [addr(m, s), addr(x, s), addr(out, s)];
                for (cfg, args) in strip_gemm_launches(rows, cols, r, BatSums::Intel, bufs) {
                    // SAFETY: m holds the blocks, x and out the strips, of a [rows, cols] weight.
                    unsafe { launch_kernel(s, &g.k, Kernel::StripGemm, cfg, &args) }?;
                }
                Ok(())
            };
        let in_order_gemm = timed("strip_gemm", 5, &mut || in_order(&blocks, &w, &mut out, rows, cols, r))?;
        // Bit for bit against the CPU's in-order sum (which faer's GEMM equals where
        // ops::gemm_is_in_order), on random values: how many of the kernel's values, and of
        // cuBLAS's, are the CPU's, for r = 64 (16-byte loads) and r = 6 (a column a thread), and
        // where torch cuts k into blocks.
        let mut rand = crate::ops::Xorshift(0x2545_F491_4F6C_DD1D);
        let mut agree = |cr: usize, cc: usize, r: usize| -> Result<String> {
            let (xs, ms) = (rand.values(cr * cc, 1.0), rand.values(cr * r, 0.1));
            let mut cpu = vec![0f32; cr * cc];
            for (k, (c, x)) in cpu.chunks_exact_mut(r * cc).zip(xs.chunks_exact(r * cc)).enumerate() {
                crate::ops::gemm_in_order(c, x, &ms[k * r * r..][..r * r], cc, r, BatSums::Intel);
            }
            let dx = s.clone_htod(&xs).map_err(e("host to device copy"))?;
            let dm = s.clone_htod(&ms).map_err(e("host to device copy"))?;
            let mut dout: CudaSlice<f32> = s.alloc_zeros(cr * cc).map_err(e("allocation"))?;
            let same = |got: Vec<f32>| got.iter().zip(&cpu).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
            in_order(&dm, &dx, &mut dout, cr, cc, r)?;
            let kernel = same(s.clone_dtoh(&dout).map_err(e("device to host copy"))?);
            // SAFETY: the buffers hold the strips and blocks of a [cr, cc] weight.
            unsafe { g.blas()?.gemm_strided_batched(strip_gemm_config(cr, cc, r), &dm, &dx, &mut dout) }
                .map_err(|e| anyhow!("cuBLAS strided SGEMM: {e:?}"))?;
            let cublas = same(s.clone_dtoh(&dout).map_err(e("device to host copy"))?);
            Ok(format!("r = {r} [{cr}, {cc}]: in-order kernel {kernel}, cuBLAS {cublas} of {}", cr * cc))
        };
        // r = 776 sums k in three blocks (three launches, 16-byte loads), r = 390 in two halves of
        // 195 (a column a thread)
        let agreement =
            [agree(256, 4096, 64)?, agree(252, 4092, 6)?, agree(776, 776, 776)?, agree(390, 390, 390)?].join("; ");
        // bf16, Δ rounded before it is added (once = false), the result rounded
        let (post_cfg, post_args) = bat_merge_post_launch(
            Float::BF16,
            rows,
            cols,
            r,
            false,
            true,
            [addr(&w, s), addr(&out, s), addr(&blocks, s)],
        );
        // SAFETY: bat_merge_post's arguments, for buffers of a [rows, cols] weight and its blocks.
        let post = timed("bat_merge_post", 5, &mut || unsafe {
            launch_kernel(s, &g.k, Kernel::BatMergePost, post_cfg, &post_args)
        })?;
        let flops = 2.0 * n as f64 * r as f64;
        // the + B_i pass reads w and delta and writes w, in f32
        let post_bytes = (n * 4 * 3) as f64;
        Ok(format!(
            "kernels on {} ([{rows}, {cols}] bf16, r = {r}):\n  \
             device-to-device copy   {:8.1} GB/s\n  \
             default add, one pass   {:8.1} GB/s ({:.0}% of the copy), {} (used: bytes an access x groups a thread)\n  \
             every launch, GB/s      {} (fastest: {}, {:.0}% of the copy)\n  \
             BAT strip GEMMs (f32)   {:8.1} GFLOP/s in order{}, cuBLAS {:.1} GFLOP/s pedantic math{}, {:.1} GFLOP/s default math\n  \
             the CPU's bytes         {agreement} (random values)\n  \
             BAT + B_i pass (f32)    {:8.1} GB/s",
            self.name,
            bytes / copy / 1e9,
            bytes / used_time / 1e9,
            100.0 * copy / used_time,
            name(used),
            each.join(", "),
            name(fastest.0),
            100.0 * copy / fastest.1,
            flops / in_order_gemm / 1e9,
            if StripGemm::configured() == StripGemm::InOrder { " (used)" } else { "" },
            flops / pedantic_gemm / 1e9,
            if StripGemm::configured() == StripGemm::Cublas { " (used)" } else { "" },
            flops / default_gemm / 1e9,
            post_bytes / post / 1e9
        ))
    }

    /// Pieces that may be in flight at once: the lanes (`BONE_TOOL_CUDA_LANES`, default 2; 1 runs
    /// every piece synchronously with [`Cuda::apply_chain`]).
    pub fn lanes(&self) -> usize {
        self.n_lanes.max(1)
    }

    /// Queue a chain on the next lane: the bytes are copied into its page-locked buffer, then the
    /// host-to-device copy, the kernels and the copy back run on the lane's stream while the caller
    /// goes on. Returns the lane, for [`Cuda::collect`].
    pub fn enqueue(&self, src: &[u8], d: Float, rows: usize, i: usize, row0: usize, ops: &[Prepared]) -> Result<usize> {
        let n = rows * i;
        anyhow::ensure!(src.len() == n * d.size(), "enqueue: byte count");
        let state = self.state()?;
        let g = state.as_ref().expect("state() checks");
        g.ctx.bind_to_thread().map_err(e("context"))?;
        let k = self.next_lane.fetch_add(1, Ordering::Relaxed) % g.lanes.len();
        let mut guard = g.lanes[k].lock().map_err(|_| anyhow!("a GPU lane was poisoned"))?;
        let lane = &mut *guard;
        anyhow::ensure!(lane.pending.is_none(), "internal error: GPU lane {k} reused before it was collected");
        lane.reserve(&g.ctx, src.len(), n)?;
        if StripGemm::configured().needs_cublas(ops) && lane.blas.is_none() {
            lane.blas = Some(new_blas(&lane.stream)?);
        }
        let l = lane.bufs.as_mut().expect("reserved");
        let s = &lane.stream;
        // The lane is idle (collected), so its staging buffer is free.
        let t = Instant::now();
        par_copy(&mut l.pin_in.as_mut_slice().map_err(e("staging buffer"))?[..src.len()], src);
        self.phases[3].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        lane.marks[0].record(s).map_err(e("event"))?;
        {
            let (dev, _sync) = l.d_in.device_ptr_mut(s);
            let host = &l.pin_in.as_slice().map_err(e("staging buffer"))?[..src.len()];
            // SAFETY: page-locked host memory that stays untouched until the lane is collected; the
            // device buffer holds at least src.len() bytes.
            unsafe { cudarc::driver::result::memcpy_htod_async(dev, host, s.cu_stream()) }
                .map_err(e("host to device copy"))?;
        }
        lane.marks[1].record(s).map_err(e("event"))?;
        let bufs = Buffers { d_in: &l.d_in, w: &mut l.w, tmp: &mut l.tmp, d_out: &mut l.d_out };
        g.run_ops(s, lane.blas.as_ref(), bufs, d, rows, i, row0, ops)?;
        lane.marks[2].record(s).map_err(e("event"))?;
        {
            let (dev, _sync) = l.d_out.device_ptr(s);
            let host = &mut l.pin_out.as_mut_slice().map_err(e("staging buffer"))?[..src.len()];
            // SAFETY: as above; the host buffer is read only after the lane's last event completes.
            unsafe { cudarc::driver::result::memcpy_dtoh_async(host, dev, s.cu_stream()) }
                .map_err(e("device to host copy"))?;
        }
        lane.marks[3].record(s).map_err(e("event"))?;
        lane.pending = Some(src.len());
        Ok(k)
    }

    /// Wait for lane `k`'s chain and copy its result into `dst`; with `check_finite`, returns the
    /// first value that became inf or NaN (against `src`, the piece's bytes), found as it is copied.
    pub fn collect(&self, k: usize, src: &[u8], dst: &mut [u8], d: Float, check_finite: bool) -> Result<Option<usize>> {
        let state = self.state()?;
        let g = state.as_ref().expect("state() checks");
        let mut guard = g.lanes[k].lock().map_err(|_| anyhow!("a GPU lane was poisoned"))?;
        let lane = &mut *guard;
        let len = lane.pending.take().ok_or_else(|| anyhow!("internal error: GPU lane {k} has nothing to collect"))?;
        anyhow::ensure!(dst.len() == len, "collect: byte count");
        g.ctx.bind_to_thread().map_err(e("context"))?;
        let t = Instant::now();
        lane.marks[3].synchronize().map_err(e("synchronize"))?;
        self.phases[4].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let l = lane.bufs.as_ref().expect("reserved when enqueued");
        let t = Instant::now();
        let bad = d.copy_checking(src, &l.pin_out.as_slice().map_err(e("staging buffer"))?[..len], dst, check_finite);
        self.phases[3].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        for (phase, (a, b)) in [(0, 1), (1, 2), (2, 3)].into_iter().enumerate() {
            let ms = lane.marks[a].elapsed_ms(&lane.marks[b]).map_err(e("event timing"))?;
            self.phases[phase].fetch_add((ms as f64 * 1e6) as u64, Ordering::Relaxed);
        }
        Ok(bad)
    }
}

impl Drop for Cuda {
    /// A released GPU is freed before this returns: no thread is left inside the driver as the
    /// process exits.
    fn drop(&mut self) {
        if let Some(t) = self.releasing.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// `dst = src` on the rayon pool, which is idle while a GPU computes: one core copies a 16 MB piece
/// into page-locked memory at well below the bandwidth several do.
fn par_copy(dst: &mut [u8], src: &[u8]) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 20;
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| d.copy_from_slice(s));
}

/// What a piece's kernels work in: the piece's bytes (`In`), the result's bytes (`Out`), two f32
/// buffers of its elements (`W`, `Tmp`: see [`scratch_lens`]), and the blocks uploaded for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mem {
    In,
    Out,
    W,
    Tmp,
    Up(usize),
}

/// A kernel argument.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    Mem(Mem),
    U64(u64),
    I32(i32),
    F32(f32),
}

/// What [`program`] runs on: a CUDA stream ([`GpuExec`]), or in the tests the same kernels
/// compiled for the host.
pub(crate) trait Exec {
    /// Copy f32 values to a new buffer.
    fn upload(&mut self, data: &[f32]) -> Result<Mem>;
    fn launch(&mut self, k: Kernel, cfg: LaunchConfig, args: &[Arg]) -> Result<()>;
    /// cuBLAS's `C = A·B` (column-major, strided batched) with `a` an upload, `b` and `c` f32 buffers.
    fn gemm(&mut self, cfg: &StridedBatchedConfig<f32>, a: Mem, b: Mem, c: Mem) -> Result<()>;
}

/// Elements the f32 buffers `W` and `Tmp` need for `ops` over `n` elements: a lone default/mini add
/// goes bytes to bytes and needs neither; only BAT needs `Tmp`. (1 where unused: CUDA allocations
/// are never empty.)
pub(crate) fn scratch_lens(ops: &[Prepared], n: usize) -> (usize, usize) {
    let fused = matches!(ops, [Prepared::Periodic { .. }]);
    let bat = ops.iter().any(|op| !matches!(op, Prepared::Periodic { .. }));
    (if fused { 1 } else { n }, if bat { n } else { 1 })
}

/// The GPU version of [`crate::ops::apply_chain`] over the rows `row0..row0 + rows` of a weight with
/// `i` columns: `In` (bytes of dtype `d`) is decoded, put through every op, and encoded into `Out`.
/// The one-pass kernel does a lone default/mini add; `gemm` says how BAT's GEMMs are done.
#[allow(clippy::too_many_arguments)]
pub(crate) fn program(
    x: &mut impl Exec,
    d: Float,
    rows: usize,
    i: usize,
    row0: usize,
    ops: &[Prepared],
    fused: Fused,
    gemm: StripGemm,
) -> Result<()> {
    use Arg::{F32, I32, U64};
    use Mem::{In, Out, Tmp, W};
    let n = rows * i;
    anyhow::ensure!(i < 1 << 31, "a row of {i} columns: the GPU kernels index columns in 31 bits (use --device cpu)");
    anyhow::ensure!(rows < 1 << 31, "a piece of {rows} rows: the GPU kernels index rows in 31 bits (use --device cpu)");
    let dt = dt_code(d);
    let (n64, rows64, cols64) = (n as u64, rows as u64, i as u64);
    if let [Prepared::Periodic { et, r, sign, .. }] = ops {
        let e = x.upload(&et[row0 * r..(row0 + rows) * r])?;
        let (k, cfg, args) = fused.launch(d, rows, i, *r, *sign, [Arg::Mem(In), Arg::Mem(Out), Arg::Mem(e)]);
        return x.launch(k, cfg, &args);
    }
    x.launch(Kernel::Decode, grid(n), &[Arg::Mem(In), Arg::Mem(W), U64(n64), I32(dt)])?;
    for (k, op) in ops.iter().enumerate() {
        // every op but the last rounds to the weight's dtype; the encode rounds the last
        let rnd = i32::from(k + 1 < ops.len());
        match op {
            Prepared::Periodic { et, r, sign, .. } => {
                let e = x.upload(&et[row0 * r..(row0 + rows) * r])?;
                let args =
                    [Arg::Mem(W), Arg::Mem(e), U64(rows64), U64(cols64), I32(*r as i32), F32(*sign), I32(dt), I32(rnd)];
                x.launch(Kernel::Periodic, grid_2d(rows, i), &args)?;
            }
            Prepared::BatMerge { b, r, rounding } => {
                let r = *r;
                let blocks = x.upload(&b[(row0 / r) * r * r..((row0 + rows) / r) * r * r])?;
                program_strips(x, gemm, blocks, W, Tmp, [rows, i, r], rounding.sums)?;
                let bufs = [Arg::Mem(W), Arg::Mem(Tmp), Arg::Mem(blocks)];
                let (cfg, args) = bat_merge_post_launch(d, rows, i, r, rounding.once, rnd == 1, bufs);
                x.launch(Kernel::BatMergePost, cfg, &args)?;
            }
            Prepared::BatUnmerge { b, inv, r, rounding, .. } => {
                let r = *r;
                let range = (row0 / r) * r * r..((row0 + rows) / r) * r * r;
                let blocks = x.upload(&b[range.clone()])?;
                let inverses = x.upload(&inv[range])?;
                let args = [Arg::Mem(W), Arg::Mem(Tmp), Arg::Mem(blocks), U64(rows64), U64(cols64), I32(r as i32)];
                x.launch(Kernel::BatUnmergePre, grid_2d(rows, i), &args)?;
                program_strips(x, gemm, inverses, Tmp, W, [rows, i, r], rounding.sums)?;
                if rnd == 1 {
                    x.launch(Kernel::RoundAll, grid(n), &[Arg::Mem(W), U64(n64), I32(dt)])?;
                }
            }
        }
    }
    x.launch(Kernel::Encode, grid(n), &[Arg::Mem(W), Arg::Mem(Out), U64(n64), I32(dt)])
}

/// For every strip of `r` rows of a [rows, i] weight: `to_s[I, r] = from_s[I, r] · m_s[r, r]`
/// (row-major), with the in-order kernel (summed as `sums` says) or cuBLAS.
pub(crate) fn program_strips(
    x: &mut impl Exec,
    gemm: StripGemm,
    m: Mem,
    from: Mem,
    to: Mem,
    [rows, i, r]: [usize; 3],
    sums: BatSums,
) -> Result<()> {
    match gemm {
        StripGemm::Cublas => x.gemm(&strip_gemm_config(rows, i, r), m, from, to),
        StripGemm::InOrder => {
            let bufs = [Arg::Mem(m), Arg::Mem(from), Arg::Mem(to)];
            for (config, args) in strip_gemm_launches(rows, i, r, sums, bufs) {
                x.launch(Kernel::StripGemm, config, &args)?;
            }
            Ok(())
        }
    }
}

/// How `bat_merge_post` is launched for a [rows, i] weight of `d` with blocks of r (`bufs`: W, the
/// GEMM's result Δ, the blocks): `W + (Δ + B_i)`, with Δ + B_i rounded to `d` first as PEFT does
/// unless `once` ([`crate::ops::Rounding::once`]), and the sum rounded to `d` when `round`.
pub(crate) fn bat_merge_post_launch(
    d: Float,
    rows: usize,
    i: usize,
    r: usize,
    once: bool,
    round: bool,
    [w, delta, blocks]: [Arg; 3],
) -> (LaunchConfig, [Arg; 9]) {
    let args = [
        w,
        delta,
        blocks,
        Arg::U64(rows as u64),
        Arg::U64(i as u64),
        Arg::I32(r as i32),
        Arg::I32(once.into()),
        Arg::I32(dt_code(d)),
        Arg::I32(round.into()),
    ];
    (grid_2d(rows, i), args)
}

/// How `strip_gemm` is launched for a [rows, i] weight with blocks of r (`bufs`: the blocks, the
/// strips, the result), summed as `sums` says: once for each of torch's blocks of k
/// ([`BatSums::block`]; one launch up to r = 384 on Intel), in order on one stream, a thread per
/// group of `vec` columns (4 with 16-byte loads when r and the blocks' length are multiples of 4,
/// else 1), and their arguments.
pub(crate) fn strip_gemm_launches(
    rows: usize,
    i: usize,
    r: usize,
    sums: BatSums,
    [m, x, out]: [Arg; 3],
) -> impl Iterator<Item = (LaunchConfig, [Arg; 11])> {
    let block = sums.block(r);
    let v = if r.is_multiple_of(4) && block.is_multiple_of(4) { 4 } else { 1 };
    (0..r).step_by(block).map(move |k0| {
        let k1 = (k0 + block).min(r);
        let args = [
            m,
            x,
            out,
            Arg::U64(rows as u64),
            Arg::U64(i as u64),
            Arg::I32(r as i32),
            Arg::I32(v as i32),
            Arg::I32(k0 as i32),
            Arg::I32(k1 as i32),
            Arg::I32((k0 > 0).into()),
            Arg::I32((r >= sums.fused_from()).into()),
        ];
        (grid_2d(rows, i / v), args)
    })
}

/// [`program`] on a CUDA stream: every buffer of a piece is used on that stream only, in order.
struct GpuExec<'a> {
    s: &'a Arc<CudaStream>,
    blas: Option<&'a CudaBlas>,
    k: &'a [CudaFunction],
    bufs: Buffers<'a>,
    /// Freed, in stream order, when the piece's work is queued.
    ups: Vec<CudaSlice<f32>>,
}

impl GpuExec<'_> {
    /// The device address of a buffer: the kernels take them as 64-bit values, as cudarc passes them.
    fn addr(&self, m: Mem) -> Result<Arg> {
        let s: &CudaStream = self.s;
        Ok(match m {
            Mem::In => addr(self.bufs.d_in, s),
            Mem::Out => addr(&*self.bufs.d_out, s),
            Mem::W => addr(&*self.bufs.w, s),
            Mem::Tmp => addr(&*self.bufs.tmp, s),
            Mem::Up(k) => addr(self.ups.get(k).ok_or_else(|| anyhow!("internal error: no upload {k}"))?, s),
        })
    }
}

impl Exec for GpuExec<'_> {
    fn upload(&mut self, data: &[f32]) -> Result<Mem> {
        self.ups.push(self.s.clone_htod(data).map_err(e("host to device copy"))?);
        Ok(Mem::Up(self.ups.len() - 1))
    }

    fn launch(&mut self, k: Kernel, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let vals = args
            .iter()
            .map(|a| match *a {
                Arg::Mem(m) => self.addr(m),
                other => Ok(other),
            })
            .collect::<Result<Vec<_>>>()?;
        // SAFETY: `program` passes each kernel the arguments of its signature (the host emulation
        // test checks the count and kind of every one) and buffers that hold what it indexes.
        unsafe { launch_kernel(self.s, self.k, k, cfg, &vals) }
    }

    fn gemm(&mut self, cfg: &StridedBatchedConfig<f32>, a: Mem, b: Mem, c: Mem) -> Result<()> {
        let Mem::Up(ka) = a else { anyhow::bail!("internal error: GEMM with {a:?} as A") };
        let m = self.ups.get(ka).ok_or_else(|| anyhow!("internal error: no upload {ka}"))?;
        let (x, out): (&CudaSlice<f32>, &mut CudaSlice<f32>) = match (b, c) {
            (Mem::W, Mem::Tmp) => (&*self.bufs.w, &mut *self.bufs.tmp),
            (Mem::Tmp, Mem::W) => (&*self.bufs.tmp, &mut *self.bufs.w),
            _ => anyhow::bail!("internal error: GEMM from {b:?} into {c:?}"),
        };
        // SAFETY: `program` sizes the config to the buffers (rows/r strips of r·i, blocks of r·r).
        let blas = self.blas.ok_or_else(|| anyhow!("internal error: a GEMM on a lane without cuBLAS"))?;
        unsafe { blas.gemm_strided_batched(*cfg, m, x, out) }.map_err(|e| anyhow!("cuBLAS strided SGEMM: {e:?}"))
    }
}

/// Launch kernel `k` (of `kernels`, in [`Kernel`]'s order) on stream `s` with `vals`, buffers as
/// their device addresses (`Arg::U64`).
///
/// # Safety
/// `vals` are the arguments of the kernel's signature, and the buffers hold what it indexes.
unsafe fn launch_kernel(
    s: &CudaStream,
    kernels: &[CudaFunction],
    k: Kernel,
    cfg: LaunchConfig,
    vals: &[Arg],
) -> Result<()> {
    let mut b = s.launch_builder(&kernels[k as usize]);
    for v in vals {
        match v {
            Arg::U64(x) => b.arg(x),
            Arg::I32(x) => b.arg(x),
            Arg::F32(x) => b.arg(x),
            Arg::Mem(m) => anyhow::bail!("internal error: CUDA kernel {} given {m:?}, not an address", k.name()),
        };
    }
    // SAFETY: the caller's.
    unsafe { b.launch(cfg) }.map(|_| ()).map_err(|err| anyhow!("CUDA kernel {}: {err:?}", k.name()))
}

/// A buffer's device address, as a kernel argument (for buffers used on stream `s` only).
fn addr<T>(b: &CudaSlice<T>, s: &CudaStream) -> Arg {
    Arg::U64(b.device_ptr(s).0)
}

/// For every strip s of `r` rows: `out_s[I, r] = x_s[I, r] · m_s[r, r]`, all row-major.
/// Column-major, that is `out_sᵀ = m_sᵀ · x_sᵀ`: one strided-batched SGEMM with m = r, n = I, k = r,
/// A the blocks `m`, B the strips `x`, C the strips `out`.
pub(crate) fn strip_gemm_config(rows: usize, i: usize, r: usize) -> StridedBatchedConfig<f32> {
    let op = blas_sys::cublasOperation_t::CUBLAS_OP_N;
    StridedBatchedConfig {
        gemm: GemmConfig {
            transa: op,
            transb: op,
            m: r as i32,
            n: i as i32,
            k: r as i32,
            alpha: 1.0f32,
            lda: r as i32,
            ldb: r as i32,
            beta: 0.0f32,
            ldc: r as i32,
        },
        batch_size: (rows / r) as i32,
        stride_a: (r * r) as i64,
        stride_b: (r * i) as i64,
        stride_c: (r * i) as i64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_sized_by_its_first_piece_holds_every_piece_of_the_run_in_every_dtype() {
        for piece in [16 << 20, 4096, 1000] {
            // the self-check's tiny piece comes first
            let (bytes, elems) = lane_sizes(48 * 40 * 4, 48 * 40, piece);
            for d in [Float::F32, Float::F16, Float::BF16] {
                for (cols, unit) in [(2048, 1), (5632, 64), (4096, 8), (11008, 32), (7, 3)] {
                    let row_bytes = cols * d.size();
                    let rows = crate::execute::rows_per_piece(piece, row_bytes, unit);
                    if rows * row_bytes > piece {
                        continue; // one unit of rows beyond a piece: grows, as it must
                    }
                    assert!(rows * row_bytes <= bytes, "{d} {cols} piece {piece}: bytes");
                    assert!(rows * cols <= elems, "{d} {cols} piece {piece}: elements");
                }
            }
        }
    }
}
