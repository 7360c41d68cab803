//! The GPU program without a GPU: [`cuda::program`] (the exact launches, argument lists, grids and
//! GEMM configurations the GPU gets) run on the host, with the kernel source [`cuda::KERNELS`]
//! compiled as C++ and every CUDA thread of a launch run in turn, and cuBLAS's strided-batched
//! SGEMM done from its definition. Compared with the CPU path ([`ops::apply_chain`]), which the
//! PEFT fixtures check. What this cannot see: NVRTC's compilation (`scripts/nvrtc-check.sh` runs
//! the real NVRTC and ptxas, without a GPU), cudarc and the driver themselves, and the two f16
//! conversions, which are single PTX instructions on the GPU and GCC's `_Float16` here.
//! `scripts/gpu-check.sh` covers those on a GPU.

use super::cuda::{self, Arg, Exec, Fused, Kernel, Mem, StripGemm};
use crate::ops::dtype::Float;
use crate::ops::{self, BatSums, Prepared, Rounding};
use anyhow::{anyhow, bail, ensure, Result};
use cudarc::cublas::{sys as blas_sys, StridedBatchedConfig};
use cudarc::driver::LaunchConfig;
use std::ffi::{c_char, c_int, CString};
use std::sync::OnceLock;

/// Stands in for the CUDA headers: thread coordinates as globals, the bit casts, no qualifiers.
const SHIM: &str = r#"
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <utility>
#define BONE_TOOL_HOST_EMULATION 1
#if defined(__aarch64__)
#define EMU_HALF __fp16 // GCC's C++ has no _Float16 on aarch64 before GCC 13
#else
#define EMU_HALF _Float16
#endif
#define __global__ __attribute__((visibility("hidden")))
#define __device__
#define __forceinline__ inline
struct Dim3 { unsigned x, y, z; };
static thread_local Dim3 blockIdx, threadIdx, blockDim, gridDim;
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline float __fmul_rn(float a, float b) { return a * b; } // unfused: -ffp-contract=off
static inline float __fadd_rn(float a, float b) { return a + b; }
static thread_local char failure[256];
static void emu_check(bool ok, const char* what) {
    if (!ok && !failure[0]) snprintf(failure, sizeof failure, "%s", what);
}
"#;

/// Runs a kernel by name over its grid, thread after thread, converting each argument to the type
/// the kernel's signature has, and refusing a count or a kind that does not match it.
const DRIVER: &str = r#"
struct Arg {
    char kind;
    unsigned long long v;
    void need(char k) const {
        if (kind != k && !failure[0]) snprintf(failure, sizeof failure, "an argument of kind %c where the kernel takes %c", kind, k);
    }
    template <class T> operator T*() const { need('p'); return (T*)(uintptr_t)v; }
    operator unsigned long long() const { need('u'); return v; }
    operator int() const { need('i'); return (int)(long long)v; }
    operator float() const { need('f'); unsigned u = (unsigned)v; float f; memcpy(&f, &u, 4); return f; }
};
template <class... P, size_t... I>
static int run(void (*f)(P...), const Arg* a, int n, std::index_sequence<I...>) {
    if (n != (int)sizeof...(P)) {
        snprintf(failure, sizeof failure, "%d arguments where the kernel takes %d", n, (int)sizeof...(P));
        return 1;
    }
    for (unsigned bz = 0; bz < gridDim.z; bz++)
    for (unsigned by = 0; by < gridDim.y; by++)
    for (unsigned bx = 0; bx < gridDim.x; bx++)
    for (unsigned tz = 0; tz < blockDim.z; tz++)
    for (unsigned ty = 0; ty < blockDim.y; ty++)
    for (unsigned tx = 0; tx < blockDim.x; tx++) {
        blockIdx = Dim3{bx, by, bz};
        threadIdx = Dim3{tx, ty, tz};
        f(a[I]...);
        if (failure[0]) return 1;
    }
    return 0;
}
template <class... P>
static int run(void (*f)(P...), const Arg* a, int n) { return run(f, a, n, std::index_sequence_for<P...>{}); }
extern "C" __attribute__((visibility("default")))
int emu_launch(const char* name, const unsigned* grid, const unsigned* block, const Arg* a, int n, char* msg, int len) {
    failure[0] = 0;
    gridDim = Dim3{grid[0], grid[1], grid[2]};
    blockDim = Dim3{block[0], block[1], block[2]};
    int rc = 1;
    DISPATCH
    else snprintf(failure, sizeof failure, "no kernel named %s", name);
    if (rc) snprintf(msg, len, "%s", failure);
    return rc;
}
"#;

#[repr(C)]
struct EmuArg {
    kind: u8,
    v: u64,
}

type Launch =
    unsafe extern "C" fn(*const c_char, *const u32, *const u32, *const EmuArg, c_int, *mut c_char, c_int) -> c_int;

/// The kernels compiled for this machine (once per test process), or why not: Err(None) when there
/// is no C++ compiler to do it.
fn kernels() -> &'static std::result::Result<Launch, Option<String>> {
    static LIB: OnceLock<std::result::Result<Launch, Option<String>>> = OnceLock::new();
    LIB.get_or_init(|| {
        let dispatch: Vec<String> = Kernel::ALL
            .iter()
            .enumerate()
            .map(|(k, kernel)| {
                let name = kernel.name();
                let word = if k == 0 { "if" } else { "else if" };
                format!("{word} (!strcmp(name, \"{name}\")) rc = run({name}, a, n);")
            })
            .collect();
        let source = format!("{SHIM}{}{}", cuda::KERNELS, DRIVER.replace("DISPATCH", &dispatch.join("\n    ")));
        let dir = tempfile::tempdir().map_err(|e| Some(e.to_string()))?;
        let (cpp, lib) = (dir.path().join("kernels.cpp"), dir.path().join(libloading::library_filename("kernels")));
        std::fs::write(&cpp, source).map_err(|e| Some(e.to_string()))?;
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = std::process::Command::new(&cxx)
            .args(["-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-fvisibility=hidden"])
            .args(["-Wall", "-Werror", "-o"])
            .arg(&lib)
            .arg(&cpp)
            .output();
        let out = match out {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(None),
            other => other.map_err(|e| Some(format!("{cxx}: {e}")))?,
        };
        if !out.status.success() {
            return Err(Some(format!("{cxx} cannot compile the kernels:\n{}", String::from_utf8_lossy(&out.stderr))));
        }
        // SAFETY: a library we just built, whose only initialisers are its static zero values.
        let loaded = unsafe { libloading::Library::new(&lib) }
            .map_err(|e| Some(format!("cannot load the kernels compiled by {cxx}: {e}")))?;
        // SAFETY: emu_launch has the signature of `Launch`.
        let launch = *unsafe { loaded.get::<Launch>(b"emu_launch\0") }
            .map_err(|e| Some(format!("emu_launch is missing from the compiled kernels: {e}")))?;
        // the library stays loaded until the process ends; the folder goes
        std::mem::forget(loaded);
        Ok(launch)
    })
}

/// The compiled kernels, or None (with a note in the test output) without a C++ compiler.
fn launcher() -> Option<Launch> {
    match kernels() {
        Ok(f) => Some(*f),
        Err(None) => {
            // straight to stderr: the test harness captures eprintln! from passing tests
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "NOT CHECKED: no C++ compiler (c++, or $CXX) to build the GPU kernels for the host"
            );
            None
        }
        Err(Some(e)) => panic!("{e}"),
    }
}

/// Words of a bit pattern no kernel writes, after the end of every buffer.
const GUARD: usize = 16;
/// A NaN pattern, made different for every buffer (so that a kernel copying one buffer's guard
/// into another's is seen too).
static CANARY: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0x7fc0_0000);

/// A host buffer of `len` bytes (rounded up to whole words) followed by the guard.
struct HostBuf {
    words: Vec<u32>,
    len: usize,
    canary: u32,
}

impl HostBuf {
    fn new(len: usize) -> HostBuf {
        let n = len.div_ceil(4);
        let canary = CANARY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut words = vec![0u32; n + GUARD];
        // as cudaMalloc's (256-aligned), so that the kernels' 16-byte accesses are checked for
        // alignment within the buffer (the allocator gives 16 on x86-64)
        assert_eq!(words.as_ptr() as usize % 16, 0, "a host buffer that is not 16-byte aligned");
        words[n..].fill(canary);
        HostBuf { words, len, canary }
    }

    fn from_f32(v: &[f32]) -> HostBuf {
        let mut b = HostBuf::new(v.len() * 4);
        b.words[..v.len()].iter_mut().zip(v).for_each(|(w, x)| *w = x.to_bits());
        b
    }

    fn intact(&self) -> bool {
        self.words[self.len.div_ceil(4)..].iter().all(|&w| w == self.canary)
    }

    fn bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_ne_bytes()).take(self.len).collect()
    }

    fn f32s(&self) -> Vec<f32> {
        self.words[..self.len / 4].iter().map(|&w| f32::from_bits(w)).collect()
    }
}

/// [`cuda::program`] on the host.
struct HostExec {
    launch: Launch,
    /// In, Out, W, Tmp.
    mem: [HostBuf; 4],
    ups: Vec<HostBuf>,
    /// Run every launch on a grid of at most 3×3 blocks of 13 threads, so that each thread takes
    /// many elements: the kernels' grid-stride loops must still cover everything once (a stride of
    /// 39 columns is no multiple of any r here, so the residues wrap in every way).
    small_grid: bool,
    launched: Vec<Kernel>,
}

impl HostExec {
    /// Buffers sized as the GPU's synchronous path sizes them (the tightest).
    fn new(launch: Launch, src: &[u8], ops: &[Prepared], n: usize, small_grid: bool) -> HostExec {
        let (w, tmp) = cuda::scratch_lens(ops, n);
        let mut input = HostBuf::new(src.len());
        for (word, chunk) in input.words.iter_mut().zip(src.chunks(4)) {
            let mut b = [0u8; 4];
            b[..chunk.len()].copy_from_slice(chunk);
            *word = u32::from_ne_bytes(b);
        }
        let mem = [input, HostBuf::new(src.len()), HostBuf::new(w * 4), HostBuf::new(tmp * 4)];
        HostExec { launch, mem, ups: vec![], small_grid, launched: vec![] }
    }

    fn buf(&mut self, m: Mem) -> Result<&mut HostBuf> {
        Ok(match m {
            Mem::In => &mut self.mem[0],
            Mem::Out => &mut self.mem[1],
            Mem::W => &mut self.mem[2],
            Mem::Tmp => &mut self.mem[3],
            Mem::Up(k) => self.ups.get_mut(k).ok_or_else(|| anyhow!("no upload {k}"))?,
        })
    }
}

impl Exec for HostExec {
    fn upload(&mut self, data: &[f32]) -> Result<Mem> {
        self.ups.push(HostBuf::from_f32(data));
        Ok(Mem::Up(self.ups.len() - 1))
    }

    fn launch(&mut self, k: Kernel, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let mut emu = vec![];
        for a in args {
            emu.push(match *a {
                Arg::Mem(m) => EmuArg { kind: b'p', v: self.buf(m)?.words.as_mut_ptr() as u64 },
                Arg::U64(v) => EmuArg { kind: b'u', v },
                Arg::I32(v) => EmuArg { kind: b'i', v: v as i64 as u64 },
                Arg::F32(v) => EmuArg { kind: b'f', v: v.to_bits() as u64 },
            });
        }
        let (mut g, mut b) = (cfg.grid_dim, cfg.block_dim);
        if self.small_grid {
            g = (g.0.min(3), g.1.min(3), g.2.min(1));
            b = (b.0.min(13), b.1.min(1), b.2.min(1));
        }
        let name = CString::new(k.name()).expect("no NUL in a kernel name");
        let mut msg = [0 as c_char; 256];
        // SAFETY: every pointer argument is a live host buffer; the driver checks kinds and count.
        let rc = unsafe {
            (self.launch)(
                name.as_ptr(),
                [g.0, g.1, g.2].as_ptr(),
                [b.0, b.1, b.2].as_ptr(),
                emu.as_ptr(),
                emu.len() as c_int,
                msg.as_mut_ptr(),
                msg.len() as c_int,
            )
        };
        if rc != 0 {
            // SAFETY: the driver writes a NUL-terminated message into msg.
            let why = unsafe { std::ffi::CStr::from_ptr(msg.as_ptr()) }.to_string_lossy().into_owned();
            bail!("kernel {}: {why}", k.name());
        }
        let names = ["In", "Out", "W", "Tmp"];
        for (m, name) in self.mem.iter().zip(names) {
            ensure!(m.intact(), "kernel {} wrote past the end of {name}", k.name());
        }
        ensure!(self.ups.iter().all(HostBuf::intact), "kernel {} wrote past the end of an upload", k.name());
        self.launched.push(k);
        Ok(())
    }

    /// cublasSgemmStridedBatched, from its definition: for each batch p,
    /// `C_p[i + j·ldc] = α Σ_l A_p[i + l·lda] · B_p[l + j·ldb] + β C_p[i + j·ldc]`, column-major,
    /// every index checked against the buffers.
    fn gemm(&mut self, cfg: &StridedBatchedConfig<f32>, a: Mem, b: Mem, c: Mem) -> Result<()> {
        let g = &cfg.gemm;
        let n_op = blas_sys::cublasOperation_t::CUBLAS_OP_N;
        ensure!(g.transa == n_op && g.transb == n_op, "only untransposed GEMMs are emulated");
        ensure!(b != c && a != c, "a GEMM may not write its input");
        let (av, bv, mut cv) = (self.buf(a)?.f32s(), self.buf(b)?.f32s(), self.buf(c)?.f32s());
        let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
        let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
        ensure!(lda >= m && ldb >= k && ldc >= m, "leading dimensions below the rows");
        for p in 0..cfg.batch_size as usize {
            let (oa, ob, oc) = (p * cfg.stride_a as usize, p * cfg.stride_b as usize, p * cfg.stride_c as usize);
            ensure!(oa + (k - 1) * lda + m <= av.len(), "A of batch {p} runs past its {} elements", av.len());
            ensure!(ob + (n - 1) * ldb + k <= bv.len(), "B of batch {p} runs past its {} elements", bv.len());
            ensure!(oc + (n - 1) * ldc + m <= cv.len(), "C of batch {p} runs past its {} elements", cv.len());
            for j in 0..n {
                for i in 0..m {
                    let dot: f64 = (0..k).map(|l| av[oa + i + l * lda] as f64 * bv[ob + l + j * ldb] as f64).sum();
                    let x = &mut cv[oc + i + j * ldc];
                    *x = (g.alpha as f64 * dot + if g.beta == 0.0 { 0.0 } else { g.beta as f64 * *x as f64 }) as f32;
                }
            }
        }
        let out = self.buf(c)?;
        out.words.iter_mut().zip(&cv).for_each(|(w, x)| *w = x.to_bits());
        Ok(())
    }
}

/// Deterministic values in [-scale/2, scale/2).
fn values(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    ops::Xorshift(seed | 1).values(n, scale)
}

/// The bytes of a deterministic `[o, i]` weight of dtype `d`.
fn weight(d: Float, o: usize, i: usize) -> Vec<u8> {
    let mut all = vec![0u8; o * i * d.size()];
    d.encode(&values(o * i, 0.5, (o * 31 + i) as u64), &mut all);
    all
}

/// The rows `row0..row0 + rows` of the weight `all` (`i` columns) through `chain`: the CPU's bytes
/// and the emulated GPU's, with the kernels it launched.
#[allow(clippy::too_many_arguments)]
fn both(
    launch: Launch,
    d: Float,
    all: &[u8],
    i: usize,
    row0: usize,
    rows: usize,
    chain: &[Prepared],
    small_grid: bool,
    fused: Fused,
    gemm: StripGemm,
) -> Result<(Vec<u8>, Vec<u8>, Vec<Kernel>)> {
    let src = &all[row0 * i * d.size()..(row0 + rows) * i * d.size()];
    let mut cpu = vec![0u8; src.len()];
    ops::apply_chain(src, &mut cpu, d, rows, i, row0, chain, false);
    let mut x = HostExec::new(launch, src, chain, rows * i, small_grid);
    cuda::program(&mut x, d, rows, i, row0, chain, fused, gemm)?;
    Ok((cpu, x.mem[1].bytes(), x.launched))
}

/// The same bytes (`exact`), or values that agree by [`Float::disagreement`].
fn assert_agree(d: Float, cpu: &[u8], gpu: &[u8], exact: bool, what: &str) {
    if exact {
        if let Some(k) = cpu.iter().zip(gpu).position(|(a, b)| a != b) {
            panic!("{what}: byte {k} differs (CPU {:#04x}, GPU program {:#04x})", cpu[k], gpu[k]);
        }
        return;
    }
    if let Some((k, a, b)) = d.disagreement_in(cpu, gpu) {
        panic!("{what}: element {k}: CPU {a} vs GPU program {b}");
    }
}

fn periodic(block: &[f32], r: usize, cols: usize, o: usize, sign: f32, rd: Rounding) -> Prepared {
    Prepared::Periodic { et: ops::expand_transposed(block, r, cols, o), r, sign, rounding: rd }
}

#[test]
fn default_and_mini_chains_give_the_cpus_bytes() {
    let Some(launch) = launcher() else { return };
    // 44 columns with r = 8: a tail of 4 (8-byte groups in f16/bf16, 16-byte in f32); 301 with
    // r = 6: a tail of 1 and one element at a time, two blocks of threads a row; 400 with r = 7:
    // 16-byte groups that the tiny grid strides over; 48 with r = 3: residues that wrap inside a
    // group; 50 with r = 5: 8-byte groups of f32. Mini blocks of 6, 5 or 2 columns tile the rows.
    let shapes = [(48, 44, 8, 6), (30, 301, 6, 5), (14, 400, 7, 5), (9, 48, 3, 2), (10, 50, 5, 5)];
    for (o, i, r, mini) in shapes {
        default_and_mini_shape(launch, o, i, r, mini);
    }
    // every access width of the one-pass add ran, in every dtype, with and without unrolling
    for d in [Float::F32, Float::F16, Float::BF16] {
        for unroll in [1, 4] {
            let widths: std::collections::BTreeSet<usize> =
                shapes.iter().map(|&(_, i, _, _)| Fused { unroll, ..DEFAULT_LAUNCH }.access_bytes(d, i)).collect();
            assert_eq!(widths.into_iter().collect::<Vec<_>>(), [0, 8, 16], "{d}");
        }
    }
}

/// The launches of the one-pass add the tests run: the default, each narrower width, four groups a
/// thread, and grids of two rows of blocks and one (each thread strides over the rows).
const LAUNCHES: [Fused; 6] = [
    Fused { max_bytes: 16, unroll: 1, grid_rows: Fused::ALL_ROWS },
    Fused { max_bytes: 16, unroll: 4, grid_rows: Fused::ALL_ROWS },
    Fused { max_bytes: 8, unroll: 4, grid_rows: Fused::ALL_ROWS },
    Fused { max_bytes: 0, unroll: 1, grid_rows: Fused::ALL_ROWS },
    Fused { max_bytes: 16, unroll: 1, grid_rows: 2 },
    Fused { max_bytes: 16, unroll: 4, grid_rows: 1 },
];

/// For the chains without a one-pass add.
const DEFAULT_LAUNCH: Fused = Fused { max_bytes: 16, unroll: 1, grid_rows: Fused::ALL_ROWS };

fn default_and_mini_shape(launch: Launch, o: usize, i: usize, r: usize, mini: usize) {
    let def = values(r * o, 0.05, 7);
    let mini_block = values(r * mini, 0.05, 11);
    for d in [Float::F32, Float::F16, Float::BF16] {
        let rd = Rounding::peft(d);
        let chains: Vec<(&str, Vec<Prepared>)> = vec![
            ("default merge", vec![periodic(&def, r, o, o, 1.0, rd)]),
            ("default unmerge", vec![periodic(&def, r, o, o, -1.0, rd)]),
            ("mini merge", vec![periodic(&mini_block, r, mini, o, 1.0, rd)]),
            ("default then mini", vec![periodic(&def, r, o, o, 1.0, rd), periodic(&mini_block, r, mini, o, -1.0, rd)]),
        ];
        for (what, chain) in &chains {
            // the whole weight, and a piece from the middle
            for (row0, rows) in [(0, o), (o / 5 + 1, o / 2)] {
                for (small, fused) in [false, true].into_iter().flat_map(|s| LAUNCHES.map(|f| (s, f))) {
                    let (cpu, gpu, launched) =
                        both(launch, d, &weight(d, o, i), i, row0, rows, chain, small, fused, StripGemm::InOrder)
                            .unwrap();
                    let what = format!(
                        "{what}, {d}, [{o}, {i}] r {r}, rows {row0}..{}, small grid {small}, {fused:?}",
                        row0 + rows
                    );
                    assert_agree(d, &cpu, &gpu, true, &what);
                    if chain.len() == 1 {
                        assert_eq!(launched, [fused.kernel()], "{what}: one pass");
                    }
                }
            }
        }
    }
}

#[test]
fn bat_chains_give_the_cpus_bytes_with_the_in_order_gemm_and_agree_with_cublas() {
    let Some(launch) = launcher() else { return };
    // r = 8 and 64 (16-byte loads, products fused into the sums); r = 6 with rows of 300 columns
    // (two blocks of threads a row, one column a thread), r = 3 and r = 4 (16-byte loads): products
    // rounded before they are added, as below r = 8 the CPU (and PEFT's torch on an Intel
    // processor) does; on an AMD processor up to r = 11 (r = 8: unfused there)
    for sums in [BatSums::Intel, BatSums::Amd] {
        for (o, i, r) in [(48, 40, 8), (36, 300, 6), (320, 128, 64), (15, 12, 3), (24, 20, 4), (66, 33, 11)] {
            assert!(ops::gemm_is_in_order(r, sums), "the CPU's GEMM sums in order here (see ops' tests)");
            if sums.splits_heads(r) {
                // MKL's sums at the heads of rows, which only the CPU computes
                let chain = [Prepared::BatMerge {
                    b: values(o * r, 0.2, 3),
                    r,
                    rounding: Rounding { sums, ..Rounding::peft(Float::F32) },
                }];
                assert!(super::cpu_only(&chain, i) && !super::same_bytes_on_every_device(&chain, i));
                continue;
            }
            bat_shape(launch, o, i, r, StripGemm::InOrder, sums);
        }
    }
    for (o, i, r) in [(48, 40, 8), (36, 300, 6)] {
        bat_shape(launch, o, i, r, StripGemm::Cublas, BatSums::Intel);
    }
}

fn bat_shape(launch: Launch, o: usize, i: usize, r: usize, gemm: StripGemm, sums: BatSums) {
    let b = values(o * r, 0.2, 3);
    let inv = ops::bat_inverses(&b, r).unwrap().inv;
    let def = values(r * o, 0.05, 5);
    for d in [Float::F32, Float::F16, Float::BF16] {
        let rd = Rounding { sums, ..Rounding::peft(d) };
        let once = Rounding { once: true, ..rd };
        let merge = |rounding| Prepared::BatMerge { b: b.clone(), r, rounding };
        let unmerge = Prepared::BatUnmerge { b: b.clone(), inv: inv.clone(), r, rounding: rd, transposed: false };
        let chains: Vec<(&str, Vec<Prepared>)> = vec![
            ("BAT merge", vec![merge(rd)]),
            ("BAT merge, rounded once", vec![merge(once)]),
            ("BAT unmerge", vec![unmerge.clone()]),
            ("BAT merge then default", vec![merge(rd), periodic(&def, r, o, o, 1.0, rd)]),
            ("default then BAT merge", vec![periodic(&def, r, o, o, 1.0, rd), merge(rd)]),
            (
                "BAT merge, unmerge, default unmerge",
                vec![merge(rd), unmerge.clone(), periodic(&def, r, o, o, -1.0, rd)],
            ),
        ];
        for (what, chain) in &chains {
            // the whole weight, and a piece of whole strips from the middle
            for (row0, rows) in [(0, o), (2 * r, 3 * r)] {
                for small in [false, true] {
                    let (cpu, gpu, launched) =
                        both(launch, d, &weight(d, o, i), i, row0, rows, chain, small, DEFAULT_LAUNCH, gemm).unwrap();
                    let what = format!(
                        "{what}, {d}, [{o}, {i}] r {r}, rows {row0}..{}, small grid {small}, {gemm:?}, {sums:?}",
                        row0 + rows
                    );
                    // the emulated cuBLAS sums in f64: within a unit of the CPU's in-order sum
                    assert_agree(d, &cpu, &gpu, gemm == StripGemm::InOrder, &what);
                    assert_eq!(launched.contains(&Kernel::StripGemm), gemm == StripGemm::InOrder, "{what}");
                }
            }
        }
    }
}

#[test]
fn the_in_order_gemm_sums_zero_products_to_plus_zero_as_the_cpu_does() {
    let Some(launch) = launcher() else { return };
    let (rows, i, r) = (8, 16, 4);
    let n = rows * i;
    let chain = [Prepared::BatMerge { b: vec![], r, rounding: Rounding::peft(Float::F32) }];
    let mut x = HostExec::new(launch, &vec![0u8; n * 4], &chain, n, false);
    // rows of -0 and of +0 against a block of +1 and one of -1: in half the rows every product is
    // -0 (whose in-order sum from -0 would be -0), in the other half +0
    let w: Vec<f32> = (0..n).map(|k| if (k / i) % 2 == 0 { -0.0 } else { 0.0 }).collect();
    let m: Vec<f32> = (0..(rows / r) * r * r).map(|k| if k < r * r { 1.0 } else { -1.0 }).collect();
    x.mem[2].words[..n].iter_mut().zip(&w).for_each(|(word, v)| *word = v.to_bits());
    let blocks = x.upload(&m).unwrap();
    cuda::program_strips(&mut x, StripGemm::InOrder, blocks, Mem::W, Mem::Tmp, [rows, i, r], BatSums::Intel).unwrap();
    let mut cpu = vec![0f32; n];
    for (s, (c, strip)) in cpu.chunks_exact_mut(r * i).zip(w.chunks_exact(r * i)).enumerate() {
        ops::gemm_in_order(c, strip, &m[s * r * r..][..r * r], i, r, BatSums::Intel);
    }
    let gpu = x.mem[3].f32s();
    assert!(gpu.iter().chain(&cpu).all(|v| v.to_bits() == 0), "every sum +0: GPU {gpu:?}, CPU {cpu:?}");
}

#[test]
fn the_in_order_gemm_sums_in_torchs_blocks() {
    // Intel: r = 392: 16-byte loads, halves of 196; r = 388: halves of 194, a column a thread;
    // r = 384: one sum; r = 776: blocks of 384, 384 and 8 (16-byte loads); r = 778: 384, 384 and 10
    // (a column a thread). AMD: r = 192: one sum; r = 200: halves of 100 (16-byte loads); r = 193:
    // 96, 96 and 1; r = 400: 192, 192 and 16; r = 390: 192, 192 and 6 (a column a thread). The
    // CPU's in-order sum cuts at ops::BatSums::block (pinned against torch there).
    let Some(launch) = launcher() else { return };
    let intel = [392, 388, 384, 776, 778].map(|r| (BatSums::Intel, r, r != 384));
    let amd = [192, 200, 193, 400, 390].map(|r| (BatSums::Amd, r, r != 192));
    for (sums, r, blocks) in intel.into_iter().chain(amd) {
        assert_eq!(sums.block(r) < r, blocks);
        let (rows, i) = (r, r);
        let n = rows * i;
        let chain = [Prepared::BatMerge { b: vec![], r, rounding: Rounding { sums, ..Rounding::peft(Float::F32) } }];
        let mut x = HostExec::new(launch, &vec![0u8; n * 4], &chain, n, false);
        let (w, m) = (values(n, 1.0, 11), values(r * r, 0.1, 12));
        x.mem[2].words[..n].iter_mut().zip(&w).for_each(|(word, v)| *word = v.to_bits());
        let blocks = x.upload(&m).unwrap();
        cuda::program_strips(&mut x, StripGemm::InOrder, blocks, Mem::W, Mem::Tmp, [rows, i, r], sums).unwrap();
        let mut cpu = vec![0f32; n];
        ops::gemm_in_order(&mut cpu, &w, &m, i, r, sums);
        let gpu = x.mem[3].f32s();
        let differ = gpu.iter().zip(&cpu).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differ, 0, "r = {r} {sums:?}: {differ} of {n} values differ from the CPU's");
    }
}

#[test]
fn nan_weights_come_out_as_the_cpus_quieted_nans() {
    // A NaN weight plus a delta is that NaN with its quiet bit set on the CPU (x86's add and F16C,
    // torch's W + delta); the kernels say so themselves, where a GPU would give its canonical NaN.
    // Quiet and signalling NaNs with payloads, of either sign, in every dtype, through the one-pass
    // add at every width and the separate decode, add and encode kernels of a chain.
    let Some(launch) = launcher() else { return };
    let (o, i, r, mini) = (10, 52, 4, 5);
    let def = values(r * o, 0.05, 7);
    let mini_block = values(r * mini, 0.05, 11);
    for d in [Float::F32, Float::F16, Float::BF16] {
        let mut all = weight(d, o, i);
        d.put_test_nans(&mut all);
        let rd = Rounding::peft(d);
        let chains: Vec<(&str, Vec<Prepared>)> = vec![
            ("default merge", vec![periodic(&def, r, o, o, 1.0, rd)]),
            ("default unmerge", vec![periodic(&def, r, o, o, -1.0, rd)]),
            ("default then mini", vec![periodic(&def, r, o, o, 1.0, rd), periodic(&mini_block, r, mini, o, -1.0, rd)]),
        ];
        for (what, chain) in &chains {
            for fused in LAUNCHES {
                let (cpu, gpu, _) = both(launch, d, &all, i, 0, o, chain, false, fused, StripGemm::InOrder).unwrap();
                let what = format!("{what}, {d}, {fused:?}");
                assert_agree(d, &cpu, &gpu, true, &what);
                // the CPU's rule itself: every NaN weight is that NaN, quieted
                for k in (0..o * i).step_by(7) {
                    let (x, y) = (&all[k * d.size()..][..d.size()], &cpu[k * d.size()..][..d.size()]);
                    let quiet: &[u8] = &match d {
                        Float::F32 => (u32::from_le_bytes(x.try_into().unwrap()) | 0x0040_0000).to_le_bytes().to_vec(),
                        Float::F16 => (u16::from_le_bytes(x.try_into().unwrap()) | 0x0200).to_le_bytes().to_vec(),
                        Float::BF16 => (u16::from_le_bytes(x.try_into().unwrap()) | 0x0040).to_le_bytes().to_vec(),
                    };
                    assert_eq!(y, quiet, "{what}: element {k}");
                }
            }
        }
    }
}

#[test]
fn the_one_pass_add_covers_rows_beyond_the_grids_65535() {
    let Some(launch) = launcher() else { return };
    let (o, i, r) = (70_000, 3, 2);
    let block = values(r * o, 0.05, 13);
    let chain = [periodic(&block, r, o, o, 1.0, Rounding::peft(Float::BF16))];
    let (cpu, gpu, _) = both(
        launch,
        Float::BF16,
        &weight(Float::BF16, o, i),
        i,
        0,
        o,
        &chain,
        false,
        DEFAULT_LAUNCH,
        StripGemm::InOrder,
    )
    .unwrap();
    assert_agree(Float::BF16, &cpu, &gpu, true, "70000 rows");
}

#[test]
fn the_emulation_refuses_wrong_arguments_and_overruns() {
    let Some(launch) = launcher() else { return };
    let src = vec![0u8; 64];
    let mut x = HostExec::new(launch, &src, &[], 16, false);
    // decode(in, out, n: u64, dt: int) given an int where it takes a u64
    let wrong_kind = [Arg::Mem(Mem::In), Arg::Mem(Mem::W), Arg::I32(16), Arg::I32(0)];
    let err = x.launch(Kernel::Decode, cuda::grid(16), &wrong_kind).unwrap_err().to_string();
    assert!(err.contains("kind i where the kernel takes u"), "{err}");
    let short = [Arg::Mem(Mem::In), Arg::Mem(Mem::W), Arg::U64(16)];
    let err = x.launch(Kernel::Decode, cuda::grid(16), &short).unwrap_err().to_string();
    assert!(err.contains("3 arguments where the kernel takes 4"), "{err}");
    // 17 f32 into a 16-element W
    let over = [Arg::Mem(Mem::In), Arg::Mem(Mem::W), Arg::U64(17), Arg::I32(0)];
    let err = x.launch(Kernel::Decode, cuda::grid(17), &over).unwrap_err().to_string();
    assert!(err.contains("wrote past the end of W"), "{err}");
}

#[test]
fn the_emulated_gemm_refuses_a_config_that_overruns_its_buffers() {
    let Some(launch) = launcher() else { return };
    let (rows, i, r) = (16, 8, 4);
    let mut x = HostExec::new(
        launch,
        &vec![0u8; rows * i * 4],
        &[Prepared::BatMerge { b: vec![], r, rounding: Rounding::peft(Float::F32) }],
        rows * i,
        false,
    );
    let blocks = x.upload(&values(rows * r, 1.0, 1)).unwrap();
    x.gemm(&cuda::strip_gemm_config(rows, i, r), blocks, Mem::W, Mem::Tmp).unwrap();
    // one strip too many
    let err = x.gemm(&cuda::strip_gemm_config(rows + r, i, r), blocks, Mem::W, Mem::Tmp).unwrap_err();
    assert!(err.to_string().contains("runs past"), "{err}");
}
