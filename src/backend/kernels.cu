// bone-tool's GPU kernels (CUDA C++), compiled at run time by NVRTC (src/backend/cuda.rs) and,
// for the tests without a GPU, as host C++ by src/backend/cuda_on_host.rs.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Whether the f32 bits b are a NaN's (on bits, so that no compiler option can change it).
__device__ __forceinline__ bool nan_bits(u32 b) { return (b & 0x7fffffffu) > 0x7f800000u; }
__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u16 f32_to_bf16(float x) {
    u32 b = __float_as_uint(x);
    if (nan_bits(b)) return (u16)((b >> 16) | 0x40u);
    return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}
#ifdef BONE_TOOL_HOST_EMULATION
// The tests compile these kernels as C++ for the host (see cuda_on_host.rs): GCC's _Float16 (or
// aarch64's __fp16, EMU_HALF there) rounds to nearest even too.
__device__ __forceinline__ float f16_cvt(u16 h) { EMU_HALF f; __builtin_memcpy(&f, &h, 2); return (float)f; }
__device__ __forceinline__ u16 f16_cvt_rn(float x) { EMU_HALF f = (EMU_HALF)x; u16 h; __builtin_memcpy(&h, &f, 2); return h; }
#else
__device__ __forceinline__ float f16_cvt(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f16_cvt_rn(float x) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x)); return h; }
#endif
// NaNs convert as on the CPU (x86's F16C, the half crate): sign and payload kept, the quiet bit set;
// a GPU's cvt may give its canonical NaN instead.
__device__ __forceinline__ float f16_to_f32(u16 h) {
    if ((h & 0x7fffu) > 0x7c00u) return __uint_as_float(((u32)(h & 0x8000u) << 16) | 0x7fc00000u | ((u32)(h & 0x3ffu) << 13));
    return f16_cvt(h);
}
__device__ __forceinline__ u16 f32_to_f16(float x) {
    u32 b = __float_as_uint(x);
    if (nan_bits(b)) return (u16)(((b >> 16) & 0x8000u) | 0x7e00u | ((b >> 13) & 0x3ffu));
    return f16_cvt_rn(x);
}
// w + t for a weight w: a NaN weight gives that NaN, quieted, as on the CPU (ops::add_to_weight:
// x86's add, and torch's W + delta); a GPU's add gives its canonical NaN instead.
__device__ __forceinline__ float add_to_weight(float w, float t) {
    u32 b = __float_as_uint(w);
    return nan_bits(b) ? __uint_as_float(b | 0x400000u) : w + t;
}
#ifdef BONE_TOOL_HOST_EMULATION
#define ASSUME_ALIGNED(p, a) emu_check(((unsigned long long)(p) & ((a) - 1)) == 0, "a wide access at an address that is no multiple of its width")
#define UNROLL
#else
#define ASSUME_ALIGNED(p, a)
#define UNROLL _Pragma("unroll")
#endif
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

// Calls f(o, k, m) for every group of v consecutive columns (o, c..c+v) of a [rows, cols] row-major
// matrix (cols a multiple of v), with k = o*cols + c the group's first element and m = c mod r:
// rows on the grid's y axis, columns on x, both grid-stride. Columns fit in 31 bits (the host
// checks), so each thread's columns and their residues advance by adding: no division per element
// (a 64-bit one costs dozens of instructions, more than the memory time of a bf16).
template <class F>
__device__ __forceinline__ void each_group(u64 rows, u64 cols, int r, u32 v, F f) {
    u32 n = (u32)cols, ur = (u32)r, step = gridDim.x * blockDim.x * v;
    u32 c0 = (blockIdx.x * blockDim.x + threadIdx.x) * v;
    if (c0 >= n) return;
    u32 m0 = c0 % ur, dm = step % ur;
    for (u64 o = blockIdx.y; o < rows; o += gridDim.y) {
        u64 row = o * cols;
        u32 m = m0;
        for (u32 c = c0; c < n; c += step) {
            f(o, row + c, m);
            m += dm;
            if (m >= ur) m -= ur;
        }
    }
}

// Every element: groups of one column.
template <class F>
__device__ __forceinline__ void each_element(u64 rows, u64 cols, int r, F f) { each_group(rows, cols, r, 1, f); }

__device__ __forceinline__ float load_as_f32(const unsigned char* p, u64 k, int dt) {
    if (dt == 0) return ((const float*)p)[k];
    if (dt == 1) return f16_to_f32(((const u16*)p)[k]);
    return bf16_to_f32(((const u16*)p)[k]);
}

__device__ __forceinline__ void store_from_f32(unsigned char* p, u64 k, int dt, float x) {
    if (dt == 0) ((float*)p)[k] = x;
    else if (dt == 1) ((u16*)p)[k] = f32_to_f16(x);
    else ((u16*)p)[k] = f32_to_bf16(x);
}

// Default and mini: w[o, c] += sign * et[o, c mod r], then round to dt (when asked).
extern "C" __global__ void periodic(float* w, const float* et, u64 rows, u64 cols, int r, float sign, int dt, int rnd) {
    each_element(rows, cols, r, [&](u64 o, u64 k, u32 m) {
        float x = add_to_weight(w[k], sign * et[o * r + m]);
        w[k] = rnd ? round_to(x, dt) : x;
    });
}

// BAT merge after the strip GEMMs (delta = strip . B_i): delta += B_i[a, :], round it (PEFT's
// double rounding unless once), add to w, round (when asked). Strip s (rows s*r..) seen as a
// [cols, r] row-major matrix has view row kk = (o - s*r) * (cols/r) + c/r and column c mod r, and
// kk belongs to tile row a = kk / (cols/r) = o - s*r. So the term is B_s[o mod r, c mod r] =
// b[o*r + c mod r] (the blocks [rows/r, r, r] read as [rows, r]): the default add's pattern.
extern "C" __global__ void bat_merge_post(float* w, const float* delta, const float* b, u64 rows, u64 cols, int r, int once, int dt, int rnd) {
    each_element(rows, cols, r, [&](u64 o, u64 k, u32 m) {
        float d = delta[k] + b[o * r + m];
        if (!once) d = round_to(d, dt);
        float x = w[k] + d;
        w[k] = rnd ? round_to(x, dt) : x;
    });
}

// BAT unmerge before the GEMM with the inverses: diff = w - B_i[a, :] (indexed as above).
extern "C" __global__ void bat_unmerge_pre(const float* w, float* diff, const float* b, u64 rows, u64 cols, int r) {
    each_element(rows, cols, r, [&](u64 o, u64 k, u32 m) { diff[k] = w[k] - b[o * r + m]; });
}

// The values of dtype DT in one 64-bit word, from column residue m on: each plus sign * e[m],
// re-encoded (m steps on, mod r).
template <int DT>
__device__ __forceinline__ u64 add_word(u64 word, const float* e, u32& m, u32 ur, float sign) {
    const u32 bits = DT == 0 ? 32 : 16, v = 64 / bits;
    u64 res = 0;
    for (u32 j = 0; j < v; j++) { // v is 2 or 4 at compile time: unrolled
        u64 lane = word >> (bits * j);
        float x = DT == 0 ? __uint_as_float((u32)lane) : DT == 1 ? f16_to_f32((u16)lane) : bf16_to_f32((u16)lane);
        x = add_to_weight(x, sign * e[m]);
        u64 enc = DT == 0 ? (u64)__float_as_uint(x) : DT == 1 ? (u64)f32_to_f16(x) : (u64)f32_to_bf16(x);
        res |= enc << (bits * j);
        if (++m == ur) m = 0;
    }
    return res;
}

struct alignas(16) Words2 { u64 lo, hi; };

// One access of BYTES (8 or 16) bytes, as words.
template <u32 BYTES> struct Access;
template <> struct Access<8> { u64 w; };
template <> struct Access<16> { Words2 w; };

template <int DT>
__device__ __forceinline__ void add_access(Access<8>& a, const float* e, u32& m, u32 ur, float sign) {
    a.w = add_word<DT>(a.w, e, m, ur, sign);
}
template <int DT>
__device__ __forceinline__ void add_access(Access<16>& a, const float* e, u32& m, u32 ur, float sign) {
    a.w.lo = add_word<DT>(a.w.lo, e, m, ur, sign);
    a.w.hi = add_word<DT>(a.w.hi, e, m, ur, sign);
}

// The one-pass add for dtype DT, BYTES (8 or 16) per access, U groups a thread a row in flight at
// once: all U loads are issued before the first store, so that each thread keeps U * BYTES bytes
// in flight (one 2-byte load per thread and a few thousand threads per SM left the memory idle).
// A thread's groups are `stride` columns apart, the grid's width in columns (the host sizes the
// grid for U groups a thread); columns are counted in 64 bits here, as c + j * stride can pass 2^32.
template <int DT, u32 BYTES, u32 U>
__device__ __forceinline__ void fused_wide(const unsigned char* in, unsigned char* out, const float* et, u64 rows, u64 cols, int r, float sign) {
    const u32 size = DT == 0 ? 4 : 2, ur = (u32)r, v = BYTES / size;
    const u64 stride = (u64)gridDim.x * blockDim.x * v;
    const u64 c0 = ((u64)blockIdx.x * blockDim.x + threadIdx.x) * v;
    if (c0 >= cols) return;
    const u32 m0 = (u32)c0 % ur, dm = (u32)stride % ur; // c0 < cols < 2^31, stride < 2^28: 32-bit division
    for (u64 o = blockIdx.y; o < rows; o += gridDim.y) {
        const float* e = et + o * r;
        const u64 row = o * cols;
        u32 m = m0;
        for (u64 c = c0; c < cols; c += U * stride) {
            Access<BYTES> a[U];
            u32 ms[U];
UNROLL
            for (u32 j = 0; j < U; j++) {
                const u64 cj = c + j * stride;
                ms[j] = m;
                m += dm;
                if (m >= ur) m -= ur;
                if (cj < cols) {
                    const unsigned char* src = in + (row + cj) * size;
                    ASSUME_ALIGNED(src, BYTES);
                    a[j] = *(const Access<BYTES>*)src;
                }
            }
UNROLL
            for (u32 j = 0; j < U; j++) {
                const u64 cj = c + j * stride;
                if (cj < cols) {
                    add_access<DT>(a[j], e, ms[j], ur, sign);
                    unsigned char* dst = out + (row + cj) * size;
                    ASSUME_ALIGNED(dst, BYTES);
                    *(Access<BYTES>*)dst = a[j];
                }
            }
        }
    }
}

template <u32 BYTES, u32 U>
__device__ __forceinline__ void fused_dtype(const unsigned char* in, unsigned char* out, const float* et, u64 rows, u64 cols, int r, float sign, int dt) {
    if (dt == 0) fused_wide<0, BYTES, U>(in, out, et, rows, cols, r, sign);
    else if (dt == 1) fused_wide<1, BYTES, U>(in, out, et, rows, cols, r, sign);
    else fused_wide<2, BYTES, U>(in, out, et, rows, cols, r, sign);
}

template <u32 U>
__device__ __forceinline__ void fused(const unsigned char* in, unsigned char* out, const float* et, u64 rows, u64 cols, int r, float sign, int dt, int vec) {
    if (vec == 16) {
        fused_dtype<16, U>(in, out, et, rows, cols, r, sign, dt);
        return;
    }
    if (vec == 8) {
        fused_dtype<8, U>(in, out, et, rows, cols, r, sign, dt);
        return;
    }
    each_element(rows, cols, r, [&](u64 o, u64 k, u32 m) {
        store_from_f32(out, k, dt, add_to_weight(load_as_f32(in, k, dt), sign * et[o * r + m]));
    });
}

// Default and mini as the only op, in one pass over the bytes: out[o, c] = in[o, c] + sign * et[o, c mod r],
// rounded to dt (what decode, periodic without rounding, and encode do in three). vec: bytes per
// access, 16 or 8 (the host asks for a width only when a row holds whole groups of it, so every
// access is aligned), else one element at a time.
extern "C" __global__ void periodic_fused(const unsigned char* in, unsigned char* out, const float* et, u64 rows, u64 cols, int r, float sign, int dt, int vec) {
    fused<1>(in, out, et, rows, cols, r, sign, dt, vec);
}

// The same with four groups a thread in flight: a kernel of its own, since registers are counted per
// kernel and its four accesses need more of them, which would cut how many threads the one-group
// version keeps on each multiprocessor.
extern "C" __global__ void periodic_fused_x4(const unsigned char* in, unsigned char* out, const float* et, u64 rows, u64 cols, int r, float sign, int dt, int vec) {
    fused<4>(in, out, et, rows, cols, r, sign, dt, vec);
}

// BAT's strip GEMMs, summed as PEFT's torch and the CPU's GEMM sum them (ops::gemm_in_order; faer
// gives the same bytes where ops::gemm_is_in_order): for every strip s of r rows, out_s[I, r] =
// x_s[I, r] · m_s[r, r] (row-major), every element from +0 over k in order; where fused (from
// r = ops::BatSums::fused_from) one fused multiply-add per product, else each product rounded and
// then added (__fmul_rn and __fadd_rn, which the compiler never fuses). For large r torch cuts k
// into blocks (ops::BatSums::block), sums each from +0 and adds the sums in order: the host
// launches the kernel once a block, k from k0 to k1, the first storing its sums (add = 0) and each
// later one adding them to out (add = 1), in stream order. As
// elements of the [rows, cols] matrix: out[o, c] = sum over k of x[o, c - c mod r + k] · m_s[k, c mod r],
// s = o / r. A thread computes V consecutive columns of one r-chunk of a row: with V = 4 (r and k0
// multiples of 4) the chunk and the blocks' rows are read 16 bytes at a time.
template <u32 V> struct alignas(4 * V) Floats { float v[V]; };

template <u32 V>
__device__ __forceinline__ void strip_gemm_v(const float* __restrict__ m, const float* __restrict__ x, float* __restrict__ out, u64 rows, u64 cols, int r, int k0, int k1, int add, bool fused) {
    each_group(rows, cols, r, V, [&](u64 o, u64 k, u32 j) {
        const float* xs = x + (k - j);
        const float* ms = m + (u64)((u32)o / (u32)r) * r * r + j; // rows < 2^31 (the host checks)
        float acc[V];
        for (u32 t = 0; t < V; t++) acc[t] = 0.0f;
        for (int q = k0; q < k1; q += V) {
            ASSUME_ALIGNED(xs + q, 4 * V);
            const Floats<V> xv = *(const Floats<V>*)(xs + q);
            for (u32 u = 0; u < V; u++) {
                ASSUME_ALIGNED(ms + (u64)(q + u) * r, 4 * V);
                const Floats<V> b = *(const Floats<V>*)(ms + (u64)(q + u) * r);
                for (u32 t = 0; t < V; t++)
                    acc[t] = fused ? fmaf(xv.v[u], b.v[t], acc[t]) : __fadd_rn(acc[t], __fmul_rn(xv.v[u], b.v[t]));
            }
        }
        for (u32 t = 0; t < V; t++) out[k + t] = add ? __fadd_rn(out[k + t], acc[t]) : acc[t];
    });
}

// vec: 4 when r (then so are the columns) and k0 and k1 are multiples of 4, else 1. x and out
// are different buffers (W and Tmp): x only read (read-only loads), out written (and read back by
// the same thread where add).
extern "C" __global__ void strip_gemm(const float* __restrict__ m, const float* __restrict__ x, float* __restrict__ out, u64 rows, u64 cols, int r, int vec, int k0, int k1, int add, int fused) {
    if (vec == 4) strip_gemm_v<4>(m, x, out, rows, cols, r, k0, k1, add, fused != 0);
    else strip_gemm_v<1>(m, x, out, rows, cols, r, k0, k1, add, fused != 0);
}

extern "C" __global__ void round_all(float* w, u64 n, int dt) {
    for (u64 k = blockIdx.x * (u64)blockDim.x + threadIdx.x; k < n; k += (u64)gridDim.x * blockDim.x)
        w[k] = round_to(w[k], dt);
}
