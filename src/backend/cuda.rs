//! The NVIDIA GPU backend: the same op chain as `ops::apply_chain`, on the device.
//!
//! Decoding, the default/mini add, the BAT `+ B_i` and every rounding are NVRTC-compiled kernels
//! (f32 arithmetic, round to nearest even, the same integer bf16 rounding as the CPU); the BAT
//! strip GEMMs are cuBLAS strided-batched SGEMMs in pedantic (true f32, no TF32) math mode.
//! libcuda, NVRTC and cuBLAS are loaded at run time (cudarc's dynamic loading): a machine without
//! them gets a clear error, never a crash.

use crate::ops::dtype::Float;
use crate::ops::Prepared;
use anyhow::{anyhow, Result};
use cudarc::cublas::{sys as blas_sys, CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

const KERNELS: &str = r#"
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u16 f32_to_bf16(float x) {
    u32 b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (u16)((b >> 16) | 0x40u);
    return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ float f16_to_f32(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f32_to_f16(float x) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x)); return h; }
// dt: 0 f32, 1 f16, 2 bf16
__device__ __forceinline__ float round_to(float x, int dt) {
    if (dt == 2) return bf16_to_f32(f32_to_bf16(x));
    if (dt == 1) return f16_to_f32(f32_to_f16(x));
    return x;
}

extern "C" __global__ void decode(const unsigned char* in, float* out, u64 n, int dt) {
    for (u64 k = blockIdx.x * (u64)blockDim.x + threadIdx.x; k < n; k += (u64)gridDim.x * blockDim.x) {
        if (dt == 0) out[k] = ((const float*)in)[k];
        else if (dt == 1) out[k] = f16_to_f32(((const u16*)in)[k]);
        else out[k] = bf16_to_f32(((const u16*)in)[k]);
    }
}

extern "C" __global__ void encode(const float* in, unsigned char* out, u64 n, int dt) {
    for (u64 k = blockIdx.x * (u64)blockDim.x + threadIdx.x; k < n; k += (u64)gridDim.x * blockDim.x) {
        if (dt == 0) ((float*)out)[k] = in[k];
        else if (dt == 1) ((u16*)out)[k] = f32_to_f16(in[k]);
        else ((u16*)out)[k] = f32_to_bf16(in[k]);
    }
}

// Default and mini: w[o, c] += sign * et[o, c mod r], then round to dt (when asked).
extern "C" __global__ void periodic(float* w, const float* et, u64 rows, u64 cols, int r, float sign, int dt, int rnd) {
    u64 n = rows * cols;
    for (u64 k = blockIdx.x * (u64)blockDim.x + threadIdx.x; k < n; k += (u64)gridDim.x * blockDim.x) {
        u64 o = k / cols, c = k % cols;
        float x = w[k] + sign * et[o * r + c % r];
        w[k] = rnd ? round_to(x, dt) : x;
    }
}

// BAT merge after the strip GEMMs (delta = strip . B_i): delta += B_i[a, :], round it (PEFT's
// double rounding unless once), add to w, round (when asked). Strip s holds r*cols elements seen
// as a [cols, r] row-major matrix; its view row kk belongs to tile row a = kk / (cols / r).
extern "C" __global__ void bat_merge_post(float* w, const float* delta, const float* b, u64 rows, u64 cols, int r, int once, int dt, int rnd) {
    u64 n = rows * cols, strip = (u64)r * cols, per_a = cols / r;
    for (u64 k = blockIdx.x * (u64)blockDim.x + threadIdx.x; k < n; k += (u64)gridDim.x * blockDim.x) {
        u64 s = k / strip, within = k % strip, kk = within / r, bc = within % r, a = kk / per_a;
        float d = delta[k] + b[s * r * r + a * r + bc];
        if (!once) d = round_to(d, dt);
        float x = w[k] + d;
        w[k] = rnd ? round_to(x, dt) : x;
    }
}

// BAT unmerge before the GEMM with the inverses: diff = w - B_i[a, :].
extern "C" __global__ void bat_unmerge_pre(const float* w, float* diff, const float* b, u64 rows, u64 cols, int r) {
    u64 n = rows * cols, strip = (u64)r * cols, per_a = cols / r;
    for (u64 k = blockIdx.x * (u64)blockDim.x + threadIdx.x; k < n; k += (u64)gridDim.x * blockDim.x) {
        u64 s = k / strip, within = k % strip, kk = within / r, bc = within % r, a = kk / per_a;
        diff[k] = w[k] - b[s * r * r + a * r + bc];
    }
}

extern "C" __global__ void round_all(float* w, u64 n, int dt) {
    for (u64 k = blockIdx.x * (u64)blockDim.x + threadIdx.x; k < n; k += (u64)gridDim.x * blockDim.x)
        w[k] = round_to(w[k], dt);
}
"#;

struct Kernels {
    decode: CudaFunction,
    encode: CudaFunction,
    periodic: CudaFunction,
    bat_merge_post: CudaFunction,
    bat_unmerge_pre: CudaFunction,
    round_all: CudaFunction,
}

pub struct Cuda {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    name: String,
    /// Nanoseconds spent copying to the device, in kernels (and the blocks' uploads), and copying back.
    phases: [AtomicU64; 3],
}

/// Why CUDA cannot be used here, without touching the driver when its libraries are missing.
pub fn libraries_missing() -> Option<&'static str> {
    // SAFETY: these only try to open the shared libraries.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return Some("the NVIDIA driver library (libcuda) was not found");
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            return Some("NVRTC (libnvrtc) was not found");
        }
        if !cudarc::cublas::sys::is_culib_present() {
            return Some("cuBLAS (libcublas) was not found");
        }
    }
    None
}

fn dt_code(d: Float) -> i32 {
    match d {
        Float::F32 => 0,
        Float::F16 => 1,
        Float::BF16 => 2,
    }
}

fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

impl Cuda {
    pub fn new() -> Result<Cuda> {
        if let Some(why) = libraries_missing() {
            return Err(anyhow!("{why}"));
        }
        let n = CudaContext::device_count().map_err(|e| anyhow!("the CUDA driver reports no device: {e:?}"))?;
        if n < 1 {
            return Err(anyhow!("no CUDA device"));
        }
        let ctx = CudaContext::new(0).map_err(|e| anyhow!("cannot open CUDA device 0: {e:?}"))?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device 0".into());
        let stream = ctx.default_stream();
        let ptx =
            cudarc::nvrtc::compile_ptx(KERNELS).map_err(|e| anyhow!("NVRTC could not compile the kernels: {e:?}"))?;
        let module = ctx.load_module(ptx).map_err(|e| anyhow!("cannot load the kernels: {e:?}"))?;
        let f = |name: &str| module.load_function(name).map_err(|e| anyhow!("kernel {name}: {e:?}"));
        let k = Kernels {
            decode: f("decode")?,
            encode: f("encode")?,
            periodic: f("periodic")?,
            bat_merge_post: f("bat_merge_post")?,
            bat_unmerge_pre: f("bat_unmerge_pre")?,
            round_all: f("round_all")?,
        };
        let blas = CudaBlas::new(stream.clone()).map_err(|e| anyhow!("cannot start cuBLAS: {e:?}"))?;
        // True f32 GEMMs: no TF32, whatever NVIDIA_TF32_OVERRIDE or the defaults say.
        // SAFETY: a valid handle from CudaBlas::new.
        unsafe { blas_sys::cublasSetMathMode(*blas.handle(), blas_sys::cublasMath_t::CUBLAS_PEDANTIC_MATH) }
            .result()
            .map_err(|e| anyhow!("cannot set cuBLAS math mode: {e:?}"))?;
        Ok(Cuda { stream, blas, k, name, phases: Default::default() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Seconds so far in host-to-device copies, kernels, and device-to-host copies.
    pub fn phase_seconds(&self) -> [f64; 3] {
        self.phases.each_ref().map(|a| a.load(Ordering::Relaxed) as f64 * 1e-9)
    }

    fn phase_done(&self, phase: usize, since: &mut Instant) -> Result<()> {
        self.stream.synchronize().map_err(|e| anyhow!("CUDA synchronize: {e:?}"))?;
        self.phases[phase].fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
        *since = Instant::now();
        Ok(())
    }

    /// The GPU version of [`crate::ops::apply_chain`].
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
        let s = &self.stream;
        let e = |what: &'static str| move |err: cudarc::driver::DriverError| anyhow!("CUDA {what}: {err:?}");
        let dt = dt_code(d);
        let n64 = n as u64;
        let mut since = Instant::now();
        let d_in: CudaSlice<u8> = s.clone_htod(src).map_err(e("host to device copy"))?;
        self.phase_done(0, &mut since)?;
        let mut w: CudaSlice<f32> = s.alloc_zeros(n).map_err(e("allocation"))?;
        // SAFETY (every launch): arguments match the kernel signatures above; buffers hold n elements.
        unsafe { s.launch_builder(&self.k.decode).arg(&d_in).arg(&mut w).arg(&n64).arg(&dt).launch(grid(n)) }
            .map_err(e("decode"))?;
        let mut tmp: Option<CudaSlice<f32>> = None;
        for (k, op) in ops.iter().enumerate() {
            let rnd: i32 = (k + 1 < ops.len()).into();
            let (rows64, cols64) = (rows as u64, i as u64);
            match op {
                Prepared::Periodic { et, r, sign, .. } => {
                    let et_rows = &et[row0 * r..(row0 + rows) * r];
                    let d_et = s.clone_htod(et_rows).map_err(e("host to device copy"))?;
                    let r32 = *r as i32;
                    unsafe {
                        s.launch_builder(&self.k.periodic)
                            .arg(&mut w)
                            .arg(&d_et)
                            .arg(&rows64)
                            .arg(&cols64)
                            .arg(&r32)
                            .arg(sign)
                            .arg(&dt)
                            .arg(&rnd)
                            .launch(grid(n))
                    }
                    .map_err(e("periodic"))?;
                }
                Prepared::BatMerge { b, r, rounding } => {
                    let r = *r;
                    let blocks = &b[(row0 / r) * r * r..((row0 + rows) / r) * r * r];
                    let d_b = s.clone_htod(blocks).map_err(e("host to device copy"))?;
                    let delta = match &mut tmp {
                        Some(t) => t,
                        None => tmp.insert(s.alloc_zeros(n).map_err(e("allocation"))?),
                    };
                    self.strip_gemm(&w, &d_b, delta, rows, i, r)?;
                    let (r32, once) = (r as i32, i32::from(rounding.once));
                    unsafe {
                        s.launch_builder(&self.k.bat_merge_post)
                            .arg(&mut w)
                            .arg(&*delta)
                            .arg(&d_b)
                            .arg(&rows64)
                            .arg(&cols64)
                            .arg(&r32)
                            .arg(&once)
                            .arg(&dt)
                            .arg(&rnd)
                            .launch(grid(n))
                    }
                    .map_err(e("bat_merge_post"))?;
                }
                Prepared::BatUnmerge { b, inv, r, .. } => {
                    let r = *r;
                    let range = (row0 / r) * r * r..((row0 + rows) / r) * r * r;
                    let d_b = s.clone_htod(&b[range.clone()]).map_err(e("host to device copy"))?;
                    let d_inv = s.clone_htod(&inv[range]).map_err(e("host to device copy"))?;
                    let diff = match &mut tmp {
                        Some(t) => t,
                        None => tmp.insert(s.alloc_zeros(n).map_err(e("allocation"))?),
                    };
                    let r32 = r as i32;
                    unsafe {
                        s.launch_builder(&self.k.bat_unmerge_pre)
                            .arg(&w)
                            .arg(&mut *diff)
                            .arg(&d_b)
                            .arg(&rows64)
                            .arg(&cols64)
                            .arg(&r32)
                            .launch(grid(n))
                    }
                    .map_err(e("bat_unmerge_pre"))?;
                    self.strip_gemm(diff, &d_inv, &mut w, rows, i, r)?;
                    if rnd == 1 {
                        unsafe { s.launch_builder(&self.k.round_all).arg(&mut w).arg(&n64).arg(&dt).launch(grid(n)) }
                            .map_err(e("round_all"))?;
                    }
                }
            }
        }
        let mut d_out: CudaSlice<u8> = s.alloc_zeros(src.len()).map_err(e("allocation"))?;
        unsafe { s.launch_builder(&self.k.encode).arg(&w).arg(&mut d_out).arg(&n64).arg(&dt).launch(grid(n)) }
            .map_err(e("encode"))?;
        self.phase_done(1, &mut since)?;
        s.memcpy_dtoh(&d_out, dst).map_err(e("device to host copy"))?;
        self.phase_done(2, &mut since)?;
        Ok(())
    }

    /// For every strip s of `r` rows: `out_s[I, r] = x_s[I, r] · m_s[r, r]`, all row-major.
    /// Column-major, that is `out_sᵀ = m_sᵀ · x_sᵀ`: one strided-batched SGEMM with m = r, n = I, k = r.
    fn strip_gemm(
        &self,
        x: &CudaSlice<f32>,
        m: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        rows: usize,
        i: usize,
        r: usize,
    ) -> Result<()> {
        let op = blas_sys::cublasOperation_t::CUBLAS_OP_N;
        let cfg = StridedBatchedConfig {
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
        };
        // SAFETY: the buffers hold rows/r strips of r*i elements and rows/r blocks of r*r.
        unsafe { self.blas.gemm_strided_batched(cfg, m, x, out) }.map_err(|e| anyhow!("cuBLAS strided SGEMM: {e:?}"))
    }
}
