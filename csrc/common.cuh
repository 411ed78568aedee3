// Pieces every decode kernel uses: dtype traits, the sm_80 PTX wrappers (cp.async, ldmatrix, mma.sync),
// programmatic dependent launch, the per-CTA timeline, and the host-side launch helpers. CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "params.h"

namespace mla {

template <MlaDtype DT>
struct DtypeTraits;

template <>
struct DtypeTraits<MlaDtype::kBF16> {
  using T = __nv_bfloat16;
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ T2 pack(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static __device__ __forceinline__ float2 unpack(T2 v) { return __bfloat1622float2(v); }
};

template <>
struct DtypeTraits<MlaDtype::kFP16> {
  using T = __half;
  using T2 = __half2;
  static __device__ __forceinline__ T2 pack(float a, float b) { return __floats2half2_rn(a, b); }
  static __device__ __forceinline__ float2 unpack(T2 v) { return __half22float2(v); }
};

// Normalized output rows and split partials, packed in the input dtype (docs/KERNEL.md: a partial is a convex
// combination of cache rows, so it lies in the input dtype's range, and half the bytes of fp32 at both ends).
// fp16 clamps to its finite range: P is rounded to fp16 for the tensor cores while its row sum is not, which can
// lift a row a hair past the largest cache value.
template <MlaDtype DT>
__device__ __forceinline__ typename DtypeTraits<DT>::T2 pack_out(float a, float b) {
  if constexpr (DT == MlaDtype::kFP16) {
    a = fminf(fmaxf(a, -65504.f), 65504.f);
    b = fminf(fmaxf(b, -65504.f), 65504.f);
  }
  return DtypeTraits<DT>::pack(a, b);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; with valid == false it reads nothing and writes zeros (cp.async zfill),
// which is how rows outside the visible range (possibly NaN) never reach the products.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a (16x16, row) * b (16x8, col), fp32 accumulate.
template <MlaDtype DT>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (DT == MlaDtype::kBF16) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Source of 16-byte chunk cc (latent chunks, then rope) of query row g of sequence b. A padding row (g >= S*H)
// gets q_latent itself: any valid address, since the caller's cp.async zero-fills it.
template <typename T, int R>
__device__ __forceinline__ const T* query_chunk_src(const MlaDecodeParams& p, int b, int g, int cc) {
  const T* q_lat = static_cast<const T*>(p.q_latent);
  if (g >= p.S * p.H) return q_lat;
  const int s = g / p.H, h = g % p.H;
  return cc < R / 8 ? q_lat + b * p.q_latent_sb + s * p.q_latent_ss + h * p.q_latent_sh + cc * 8
                    : static_cast<const T*>(p.q_pe) + b * p.q_pe_sb + s * p.q_pe_ss + h * p.q_pe_sh + (cc - R / 8) * 8;
}

// Programmatic dependent launch (sm_90+). Our kernels are launched with the attribute when
// MlaDecodeParams::pdl is set, so a kernel's launch and prologue overlap the tail of the kernel before
// it in the stream. The rule that keeps stream order intact: no global memory access, read or write,
// before pdl_wait() (it returns once every earlier grid has completed and its writes are visible).
// Both are no-ops when the kernel was launched without the attribute, and below sm_90.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
// Lets the next PDL kernel in the stream be scheduled now (its blocks still wait in pdl_wait for this
// grid to complete): called at the start, so that launch latency hides under this kernel.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// ---- Per-CTA timeline (dev/kernel_timeline.py): where a CTA's time goes, without a profiler's replays.
// Off unless MlaDecodeParams::timeline is set; then one thread a CTA writes a row of 32 u64 at
// (kernel, linear block index): [0] SM id, [1] x | y << 20 | z << 40 of the block, [2] its cache tiles, [3] 0,
// then stamp s as (globaltimer ns, clock64) at [2 s + 2, 2 s + 3]. globaltimer orders CTAs of different
// SMs; clock64 times the phases within one.
enum TimelineKernel : int { kTlDecode = 0, kTlCombine = 1 };
enum TimelineSlot : int {
  kTlEntry = 1,    // first instruction (read before pdl_wait, written after it)
  kTlWaited = 2,   // pdl_wait returned: the previous kernel in the stream is complete
  kTlLengths = 3,  // the sequence's lengths are read and the CTA's cache rows known
  kTlQ = 4,        // the query tile landed (wgmma kernels)
  kTlFirst = 5,    // the first tile's scores are done (wgmma kernels: warpgroup 0's first QK; mma.sync: the loop's first barrier)
  kTlLoopEnd = 6,  // the main loop is done (wgmma kernels: warpgroup 0)
  kTlLoopEnd1 = 7, // wgmma kernels: warpgroup 1's loop is done
  kTlExit = 8,     // the CTA's last global store is issued
};
// The stamps inside the wgmma kernels' warpgroup code (q, first, loop_end, the epilogue's exit) change how ptxas schedules its
// loop even when off: its H = 16 (late-QK_b) cells ran 3-7 % slower with them (same-machine A/B). They are
// built only with MLA_PATCH_TIMELINE_PHASES=1 (setup.py); the other stamps are always there.
#ifndef MLA_PATCH_TIMELINE_PHASES
#define MLA_PATCH_TIMELINE_PHASES 0
#endif
constexpr bool kTimelinePhases = MLA_PATCH_TIMELINE_PHASES != 0;
struct TimelineStamp {
  unsigned long long ns, clk;
};
__device__ __forceinline__ TimelineStamp timeline_now() {
  TimelineStamp t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t.ns));
  t.clk = clock64();
  return t;
}
__device__ __forceinline__ unsigned long long* timeline_row(const MlaDecodeParams& p, int kernel) {
  const long long blk = blockIdx.x + static_cast<long long>(gridDim.x) * (blockIdx.y + static_cast<long long>(gridDim.y) * blockIdx.z);
  if (p.timeline == nullptr || blk >= p.timeline_blocks) return nullptr;
  return p.timeline + (static_cast<long long>(kernel) * p.timeline_blocks + blk) * 32;
}
__device__ __forceinline__ void timeline_put(const MlaDecodeParams& p, int kernel, int slot, TimelineStamp t) {
  if (unsigned long long* row = timeline_row(p, kernel)) {
    row[2 * slot + 2] = t.ns;
    row[2 * slot + 3] = t.clk;
  }
}
__device__ __forceinline__ void timeline_stamp(const MlaDecodeParams& p, int kernel, int slot) {
  if (p.timeline != nullptr) timeline_put(p, kernel, slot, timeline_now());
}
// The first two stamps of every kernel: its entry (taken before pdl_wait, when no global write is allowed yet)
// and pdl_wait's return.
__device__ __forceinline__ void timeline_entered(const MlaDecodeParams& p, int kernel, TimelineStamp entry) {
  timeline_put(p, kernel, kTlEntry, entry);
  timeline_stamp(p, kernel, kTlWaited);
}
__device__ __forceinline__ void timeline_meta(const MlaDecodeParams& p, int kernel, int tiles) {
  if (unsigned long long* row = timeline_row(p, kernel)) {
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    row[0] = smid;
    row[1] = blockIdx.x | (static_cast<unsigned long long>(blockIdx.y) << 20) | (static_cast<unsigned long long>(blockIdx.z) << 40);
    row[2] = static_cast<unsigned long long>(tiles);
    row[3] = 0;
  }
}

constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;

// A CTA whose split holds none of its sequence's rows (seesaw, narrow): its M query rows from row0 (of MT) see
// nothing. With one split it writes them itself (zeros, lse -inf); else its partials' lse is -inf, which gives them
// weight 0 in the combine (their rows are never read). All 256 threads (tid).
template <typename T, int R, int M>
__device__ __forceinline__ void write_empty_split(const MlaDecodeParams& p, int tid, int b, int split, int nsplit, int MT,
                                                  int row0) {
  if (nsplit == 1) {
    T* out = static_cast<T*>(p.out_latent);
    for (int i = tid; i < M * (R / 8); i += 256) {
      const int r = i / (R / 8), cc = i % (R / 8);
      if (row0 + r < MT) {
        *reinterpret_cast<uint4*>(out + (static_cast<size_t>(b) * MT + row0 + r) * R + cc * 8) = make_uint4(0, 0, 0, 0);
      }
    }
    if (tid < M && row0 + tid < MT) p.lse[static_cast<size_t>(b) * MT + row0 + tid] = -INFINITY;
  } else if (tid < M && row0 + tid < MT) {
    p.lse_partial[(static_cast<size_t>(b) * nsplit + split) * MT + row0 + tid] = -INFINITY;
  }
}

// A paged cache's pool row of sequence b's row t (clamped: an index past the pool reads a real row, never beyond).
__device__ __forceinline__ long long pool_row(const MlaDecodeParams& p, int b, int t) {
  const int r = p.row_index[static_cast<long long>(b) * p.T + t];
  return r < 0 ? 0 : (r >= p.pool_rows ? p.pool_rows - 1 : r);
}

// ---- Host side: every launch of our kernels, with programmatic dependent launch when params.pdl is set (so a
// kernel's launch and prologue overlap the tail of the one before it). Not copyable: cfg.attrs points into it.
struct LaunchConfig {
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr[1];
  LaunchConfig(dim3 grid, int threads, size_t smem, cudaStream_t stream, bool pdl) {
    cfg.gridDim = grid;
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
  }
  LaunchConfig(const LaunchConfig&) = delete;
  LaunchConfig& operator=(const LaunchConfig&) = delete;
};

template <typename KernelFn, typename... Extra>
cudaError_t launch_kernel(KernelFn kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream,
                          const MlaDecodeParams& params, const Extra&... extra) {
  LaunchConfig launch(grid, threads, smem, stream, params.pdl != 0);
  return cudaLaunchKernelEx(&launch.cfg, kernel, params, extra...);
}

// Lets `kernel` take `smem` bytes of dynamic shared memory on the current device, once per device (`done` is the
// caller's per-kernel record). The attribute is a host-side call: no stream work, fine under graph capture.
template <typename KernelFn>
cudaError_t allow_dynamic_smem(KernelFn kernel, size_t smem, bool (&done)[64]) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < 64 && done[dev]) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err == cudaSuccess && dev >= 0 && dev < 64) done[dev] = true;
  return err;
}

// Launches a main decode kernel (every kernel has this grid: x = m_tile-row tile of the S*H query rows, y = KV
// split, z = sequence; 256 threads) after letting it take `smem` bytes.
template <typename KernelFn, typename... Extra>
cudaError_t launch_main_kernel(KernelFn kernel, int m_tile, size_t smem, bool (&smem_set)[64],
                               const MlaDecodeParams& params, cudaStream_t stream, const Extra&... extra) {
  const cudaError_t err = allow_dynamic_smem(kernel, smem, smem_set);
  if (err != cudaSuccess) return err;
  const dim3 grid(ceil_div(params.S * params.H, m_tile), params.num_splits, params.B);
  return launch_kernel(kernel, grid, 256, smem, stream, params, extra...);
}

}  // namespace mla
