// Absorbed MLA decode attention: kernel and host launcher templates (CUDA headers only, no torch).
//
// Math (see mla_patch/reference.py): for sequence b and query row g = s * H + h,
//   score[t] = (q_latent[g] . c_kv[t] + q_pe[g] . k_pe[t]) * sm_scale   for visible rows t,
//   out[g]   = softmax(score) @ c_kv,   lse[g] = log(sum exp(score)).
// All S*H query rows of a sequence share one cache (one latent KV head), so a CTA treats
// kMlaMTile of them as the M dimension of a small GEMM against each cache tile and reads
// every cache row once per M tile (H = 128 has 4 M tiles, launched adjacently so the
// repeats hit L2), instead of once per head.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "mla_cluster_ops.cuh"
#include "mla_params.h"
#include "mla_tensor_maps.h"

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

// Normalized output rows and split partials, packed in the input dtype. Split partials take the input dtype
// by default (MlaDecodeParams::partial_f32 keeps fp32): every CTA writes its partial rows at once as the main
// kernel ends and the combine reads them back, so they cost bytes at both ends with nothing to hide under
// (H = 128, B = 1, 16K: 17 MB in fp32 against the cache's 19 MB). A partial is a normalized convex
// combination of cache rows, so it lies in the input dtype's range, and one more rounding in that dtype is at
// most the output's own: a model of the splits put the error at 1.0-1.45x that of fp32 partials (FlashInfer's
// fa3 also keeps them in the output dtype). fp16 clamps to its finite range: P is rounded to fp16 for the
// tensor cores while its row sum is not, which can lift a row a hair past the largest cache value (in the
// output, a partial, or the combine's output of fp32 partials).
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

// ---- Per-CTA timeline (scripts/kernel_timeline.py): where a CTA's time goes, without a profiler's replays.
// Off unless MlaDecodeParams::timeline is set; then one thread a CTA writes a row of 32 u64 at
// (kernel, linear block index): [0] SM id, [1] x | y << 20 | z << 40 of the block, [2] its cache tiles, [3] 0,
// then stamp s as (globaltimer ns, clock64) at [2 s + 2, 2 s + 3]. globaltimer orders CTAs of different
// SMs; clock64 times the phases within one.
enum TimelineKernel : int { kTlDecode = 0, kTlCombine = 1 };
enum TimelineSlot : int {
  kTlEntry = 1,    // first instruction (read before pdl_wait, written after it)
  kTlWaited = 2,   // pdl_wait returned: the previous kernel in the stream is complete
  kTlLengths = 3,  // the sequence's lengths are read and the CTA's cache rows known
  kTlQ = 4,        // the query tile landed (v7)
  kTlFirst = 5,    // the first tile's scores are done (v7: warpgroup 0's first QK; mma.sync: the loop's first barrier)
  kTlLoopEnd = 6,  // the main loop is done (v7: warpgroup 0)
  kTlLoopEnd1 = 7, // v7: warpgroup 1's loop is done
  kTlExit = 8,     // the CTA's last global store is issued
};
// The stamps inside v7's warpgroup code (q, first, loop_end, the epilogue's exit) change how ptxas schedules its
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

// Grid: x = M tile of S*H query rows (fastest, so the M tiles sharing a cache range run together
// and the repeats come from L2), y = KV split, z = sequence. Block: 256 threads = 8 warps.
//
// Each CTA owns M (16 or 32) query rows and the rows [cb, ce) of its sequence: the visible range
// [kv_start, kv_end) cut evenly into num_splits chunks of whole 32-row tiles (the lengths are read
// here, on the GPU; an empty chunk writes lse = -inf and exits).
//
// Per 32-row cache tile i:
//   QK:  warp w = (d = w % 4, nh = w / 4) computes partial scores of all M query rows against
//        tile rows [16 nh, 16 nh + 16) over latent columns [d R/4, (d+1) R/4) plus rope k-step d
//        (if d < P/16). Its slice of Q lives in registers (loaded once); K comes from shared
//        memory with ldmatrix, each byte read by exactly one warp. The 4 partials go to shared.
//   softmax: thread (row = tid / TPR, CPT columns) sums the partials, masks, keeps the running
//        max/sum of its row (online softmax, log2 domain), writes P (input dtype) and the rescale.
//   PV:  warp w owns output columns [w R/8, (w+1) R/8) for all M rows: rescales its
//        accumulators, then P (ldmatrix) times V = the tile's latent part (ldmatrix.trans).
// Software pipeline: QK of tile i+1 is issued in the same phase as PV of tile i (independent
// tensor work side by side), so each tile costs two barriers:
//   [X] tile i+1 landed, partials of i visible, stage of tile i-1 free -> prefetch, softmax(i)
//   [Y] P(i) visible -> QK(i+1) + PV(i), partials of i+1 written.
// Shared memory: STAGES cache tiles [32][R+P+8] (cp.async, zero-filled outside [cb, ce); the Q
// tile is staged in the last one before the first prefetch reaches it), partial scores
// [4][M][40] fp32, P [M][40], per-row alpha/m/l.
// TMAQ (sm_90a, R = 512, mla_decode_tma_q_serves): the Q tile comes instead by TMA, issued by one thread (the
// query maps' box: M heads of one token a 64-column block), into its own region after those ([9][M][128 B],
// 128-byte swizzle, 1 KB aligned; OOB heads read as zeros) onto an mbarrier. The cp.async copy kept every thread
// issuing its 16-byte copies for ~1.7 us before it could issue the first cache tile's (kernel_timeline.py at
// H = 128, batch 1: pdl_wait -> lengths 2.45 us here against v7's 0.76 with its query by TMA).
// TMAK (with TMAQ): the cache tiles by TMA too, one thread issuing nine {64 columns, 32 rows} boxes a tile onto the
// stage's mbarrier, the stages in the same 128-byte-swizzled block layout inside the region of the padded ones;
// TMA reads rows past T as zeros, and the rows in [ce, T) of a split's last tile are zeroed after it lands.
template <MlaDtype DT, int R, int P, int M, int STAGES, bool TMAQ = false, bool TMAK = false>
__global__ void __launch_bounds__(256, 1)
    mla_decode_kernel(const MlaDecodeParams p, const __grid_constant__ KernelMaps<false, TMAQ, TMAK> maps) {
  using Tr = DtypeTraits<DT>;
  using T = typename Tr::T;
  using T2 = typename Tr::T2;
  constexpr int N = kMlaNTile;
  constexpr int D = R + P;
  constexpr int ROW = D + 8;      // shared row stride of cache and Q tiles (elements)
  constexpr int SP = N + 8;       // row stride of partial scores (fp32) and P (elements)
  constexpr int KL = R / 64;      // latent k-steps per QK column slice (4 slices)
  constexpr int KR = P / 16;      // rope k-steps, one per slice d < KR
  constexpr int DW = R / 8;       // output columns per warp
  constexpr int NF = DW / 8;      // n8 fragments per warp in PV
  constexpr int MF = M / 16;      // m16 fragments
  constexpr int CHUNKS = D / 8;   // 16-byte chunks per row
  constexpr int NTHREADS = 256;
  constexpr int TPR = NTHREADS / M;  // softmax threads per row
  constexpr int CPT = N / TPR;       // softmax columns per thread
  static_assert(N == 32 && (M == 16 || M == 32) && STAGES >= 3, "warp layout assumes 32-row tiles");
  static_assert(KR >= 1 && KR <= 4 && R % 64 == 0 && NF % 2 == 0, "unsupported (R, P)");

  extern __shared__ __align__(16) unsigned char smem[];
  T* s_kv = reinterpret_cast<T*>(smem);
  T* s_q = s_kv + (STAGES - 1) * N * ROW;
  float* s_part = reinterpret_cast<float*>(smem + static_cast<size_t>(STAGES) * N * ROW * sizeof(T));
  T* s_p = reinterpret_cast<T*>(s_part + 4 * M * SP);
  float* s_alpha = reinterpret_cast<float*>(s_p + M * SP);
  float* s_m = s_alpha + M;
  float* s_l = s_m + M;
  static_assert(TMAQ || !TMAK, "the TMA cache tiles come with the TMA query tile");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kTmaQ = TMAQ, kTmaK = TMAK;
#else
  constexpr bool kTmaQ = false, kTmaK = false;
  if constexpr (TMAQ) __trap();  // never launched without the sm_90a body (binding.cpp sets params.tma_q)
#endif
  constexpr int QB = D / 64;             // 64-column blocks of a query or cache row (TMAQ / TMAK: R = 512, P = 64)
  constexpr int STAGE_B = QB * N * 128;  // TMAK: a stage's bytes
  const uint32_t q_bar = smem_addr(s_l + M);               // TMAQ: the mbarrier the Q tile lands on
  const uint32_t q_tma = (q_bar + 48 + 1023) & ~1023u;     // TMAQ: the Q tile, [QB][M][128 B] swizzled
  const uint32_t kv_tma = (smem_addr(smem) + 1023) & ~1023u;  // TMAK: stage st at kv_tma + st STAGE_B
  auto stage_bar = [&](int st) { return q_bar + 8 + 8 * st; };  // TMAK: the mbarrier stage st lands on
  static_assert(!TMAK || 1024 + STAGES * STAGE_B <= STAGES * N * ROW * 2, "TMAK stages fit the padded ones");

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int gq = lane >> 2, tq = lane & 3;  // mma fragment row / column-pair of this lane
  const int b = blockIdx.z, split = blockIdx.y;
  const int MT = p.S * p.H;
  const int row0 = blockIdx.x * M;
  const int nsplit = p.num_splits;

  const TimelineStamp t_entry = timeline_now();
  pdl_launch_dependents();
  pdl_wait();
  if (tid == 0) timeline_entered(p, kTlDecode, t_entry);
  // The lengths are loaded before the Q copy is issued: the loop that issues it stalls once the SM's copies in
  // flight fill up (4.5 us for v7's 73 KB a CTA at batch 1, kernel_timeline.py on the H200), and the lengths'
  // latency now hides under that stall instead of following it.
  const int start_raw = p.kv_start[b], end_raw = p.kv_end[b];
  if constexpr (kTmaQ) {
    static_assert(!TMAQ || (R == 512 && P == 64), "128-byte rows in every block, one swizzle");
    if (tid == 0) {
      mbar_init(q_bar, 1);
      if constexpr (kTmaK) {
#pragma unroll
        for (int st = 0; st < STAGES; ++st) mbar_init(stage_bar(st), 1);
      }
      fence_mbarrier_init();  // visible to the copy engine before its bytes arrive on it
      mbar_arrive_expect_tx(q_bar, QB * M * 128);
      const int s = row0 / p.H, h0 = row0 % p.H;  // the tile is M heads of token s (mla_decode_tma_q_serves)
#pragma unroll
      for (int blk = 0; blk < QB; ++blk) {
        const CUtensorMap* map = blk < R / 64 ? &maps.q_latent : &maps.q_pe;
        tma_load_4d(q_tma + blk * M * 128, map, blk < R / 64 ? blk * 64 : 0, h0, s, b, q_bar);
      }
    }
  } else {
    // Q tile -> the last stage (rows past S*H are zero-filled). Every split of a sequence copies the same Q
    // tile at the same moment; each starts at its own offset, so they do not all ask for the same lines at once.
    const int q_rot = (split * NTHREADS) % (M * CHUNKS);
    for (int c0 = tid; c0 < M * CHUNKS; c0 += NTHREADS) {
      const int c = c0 + q_rot < M * CHUNKS ? c0 + q_rot : c0 + q_rot - M * CHUNKS;
      const int r = c / CHUNKS, cc = c % CHUNKS;
      cp_async_16(smem_addr(s_q + r * ROW + cc * 8), query_chunk_src<T, R>(p, b, row0 + r, cc), row0 + r < MT);
    }
  }
  cp_async_commit();  // TMAQ: an empty group, so the group counts below are the same on both paths

  // This CTA's cache rows. Clamping to [0, T) keeps bad lengths from ever addressing out of range.
  const int start = max(start_raw, 0);
  const int end = min(end_raw, p.T);
  const int len = max(end - start, 0);
  const int per = ceil_div(ceil_div(len, nsplit), N) * N;
  const long long cb_l = static_cast<long long>(start) + static_cast<long long>(split) * per;
  const int cb = static_cast<int>(cb_l < end ? cb_l : end);
  const int ce = static_cast<int>(min(cb_l + per, static_cast<long long>(end)));
  const int n_tiles = ce > cb ? ceil_div(ce - cb, N) : 0;

  // Softmax role: row sr of the tile, columns [sc, sc + CPT).
  const int sr = tid / TPR, sc = (tid % TPR) * CPT;
  const int sg = row0 + sr;
  const bool s_valid = sg < MT;
  const bool s_lead = (tid % TPR) == 0;

  if (tid == 0) timeline_meta(p, kTlDecode, n_tiles);
  if (n_tiles == 0) {
    // Nothing visible in this chunk: out = 0, lse = -inf (or only lse = -inf for a split partial).
    cp_async_wait<0>();  // the Q copy lands before the CTA exits
    if constexpr (kTmaQ) {
      if (tid == 0) mbar_wait(q_bar, 0);  // (thread 0 initialized the mbarrier)
    }
    if (nsplit == 1) {
      T* out = static_cast<T*>(p.out_latent);
      for (int c = tid; c < M * (R / 8); c += NTHREADS) {
        const int r = c / (R / 8), cc = c % (R / 8);
        if (row0 + r < MT) {
          *reinterpret_cast<uint4*>(out + (static_cast<size_t>(b) * MT + row0 + r) * R + cc * 8) =
              make_uint4(0, 0, 0, 0);
        }
      }
      if (s_lead && s_valid) p.lse[static_cast<size_t>(b) * MT + sg] = -INFINITY;
    } else if (s_lead && s_valid) {
      p.lse_partial[(static_cast<size_t>(b) * nsplit + split) * MT + sg] = -INFINITY;
    }
    return;
  }
  if (tid == 0) timeline_stamp(p, kTlDecode, kTlLengths);

  const T* c_kv = static_cast<const T*>(p.c_kv) + static_cast<long long>(b) * p.c_kv_sb;
  const T* k_pe = static_cast<const T*>(p.k_pe) + static_cast<long long>(b) * p.k_pe_sb;


  // Cache tile copy: a fixed chunk column per thread, so the per-tile address work is one add per
  // chunk. Latent: column tid % LCH, rows tid / LCH + k * (256 / LCH); rope: column tid % PCH,
  // row tid / PCH (threads < 32 * PCH).
  constexpr int LCH = R / 8, PCH = P / 8;
  constexpr int LROWS = NTHREADS / LCH, LPASS = N / LROWS;
  static_assert(NTHREADS % LCH == 0 && N % LROWS == 0 && N * PCH <= NTHREADS, "copy layout");
  const int l_row = tid / LCH, l_col = (tid % LCH) * 8;
  const int r_row = tid / PCH, r_col = (tid % PCH) * 8;
  const bool r_active = tid < N * PCH;
  const T* lat_src = c_kv + static_cast<long long>(cb + l_row) * p.c_kv_st + l_col;
  const T* rope_src = k_pe + static_cast<long long>(cb + r_row) * p.k_pe_st + r_col;
  const long long lat_pass = static_cast<long long>(LROWS) * p.c_kv_st;
  auto load_tile = [&](int tile, int stage) {
    if constexpr (kTmaK) {  // thread 0: nine boxes onto the stage's mbarrier
      if (tid == 0) {
        const uint32_t bar = stage_bar(stage), dst = kv_tma + stage * STAGE_B;
        mbar_arrive_expect_tx(bar, STAGE_B);
#pragma unroll
        for (int blk = 0; blk < QB; ++blk) {
          tma_load_3d(dst + blk * N * 128, blk < R / 64 ? &maps.c_kv : &maps.k_pe, blk < R / 64 ? blk * 64 : 0,
                      cb + tile * N, b, bar);
        }
      }
      return;
    }
    const int base = cb + tile * N;
    T* dst = s_kv + stage * N * ROW;
    const T* src = lat_src + static_cast<long long>(tile) * N * p.c_kv_st;
#pragma unroll
    for (int k = 0; k < LPASS; ++k) {
      const int r = l_row + k * LROWS;
      const bool valid = base + r < ce;
      cp_async_16(smem_addr(dst + r * ROW + l_col), valid ? src + k * lat_pass : c_kv, valid);
    }
    if (r_active) {
      const bool valid = base + r_row < ce;
      cp_async_16(smem_addr(dst + r_row * ROW + R + r_col),
                  valid ? rope_src + static_cast<long long>(tile) * N * p.k_pe_st : k_pe, valid);
    }
  };

#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < n_tiles) load_tile(st, st);
    cp_async_commit();
  }

  const int qd = warp & 3, nh = warp >> 2;
  // Groups so far: Q, tiles 0..STAGES-2. Q and tile 0 must have landed.
  cp_async_wait<STAGES - 2>();
  __syncthreads();
  if constexpr (kTmaQ) mbar_wait(q_bar, 0);  // after the barrier: thread 0's initialization is visible
  if constexpr (kTmaK) mbar_wait(stage_bar(0), 0);
  // Q fragments of this warp's QK column slice, into registers for the whole loop. TMAQ: column col of row r in
  // block col / 64, its 16-byte chunk (col % 64) / 8 at chunk ^ (r % 8) (the rows of one ldmatrix hit 8 banks).
  auto q_elem = [&](int r, int col) {
    if constexpr (kTmaQ) {
      return q_tma + static_cast<uint32_t>((col >> 6) * M * 128 + r * 128 + ((((col & 63) >> 3) ^ (r & 7)) << 4));
    } else {
      return smem_addr(s_q + r * ROW + col);
    }
  };
  uint32_t qa[MF][KL + 1][4];
#pragma unroll
  for (int i = 0; i < MF; ++i) {
    const int r = i * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < KL; ++kk) ldsm_x4(qa[i][kk], q_elem(r, qd * (R / 4) + kk * 16 + (lane >> 4) * 8));
    if (qd < KR) ldsm_x4(qa[i][KL], q_elem(r, R + qd * 16 + (lane >> 4) * 8));
  }

  // Shared address of element (row r, column col) of the cache tile in stage st. TMAK: column col in block
  // col / 64, its 16-byte chunk (col % 64) / 8 at chunk ^ (r % 8), as for the Q tile.
  auto kv_elem = [&](int st, int r, int col) {
    if constexpr (kTmaK) {
      const int chunk = ((col & 63) >> 3) ^ (r & 7);
      return kv_tma + static_cast<uint32_t>(st * STAGE_B + (col >> 6) * N * 128 + r * 128 + (chunk << 4));
    } else {
      return smem_addr(s_kv + st * N * ROW + r * ROW + col);
    }
  };
  // Partial scores of this warp's slice for the tile in stage st, stored to s_part when `store`.
  auto qk_partial = [&](int st, bool store) {
    float sacc[MF][2][4];
#pragma unroll
    for (int i = 0; i < MF; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) sacc[i][j][e] = 0.f;
    const int kr = nh * 16 + (lane & 7) + (lane >> 4) * 8, kc = ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < KL; ++kk) {
      uint32_t bk[4];
      ldsm_x4(bk, kv_elem(st, kr, kc + qd * (R / 4) + kk * 16));
#pragma unroll
      for (int i = 0; i < MF; ++i) {
        mma_16816<DT>(sacc[i][0], qa[i][kk], bk[0], bk[1]);
        mma_16816<DT>(sacc[i][1], qa[i][kk], bk[2], bk[3]);
      }
    }
    if (qd < KR) {
      uint32_t bk[4];
      ldsm_x4(bk, kv_elem(st, kr, kc + R + qd * 16));
#pragma unroll
      for (int i = 0; i < MF; ++i) {
        mma_16816<DT>(sacc[i][0], qa[i][KL], bk[0], bk[1]);
        mma_16816<DT>(sacc[i][1], qa[i][KL], bk[2], bk[3]);
      }
    }
    if (store) {
#pragma unroll
      for (int i = 0; i < MF; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          float* dst = s_part + (qd * M + i * 16 + gq) * SP + nh * 16 + j * 8 + 2 * tq;
          *reinterpret_cast<float2*>(dst) = make_float2(sacc[i][j][0], sacc[i][j][1]);
          *reinterpret_cast<float2*>(dst + 8 * SP) = make_float2(sacc[i][j][2], sacc[i][j][3]);
        }
    }
  };

  qk_partial(0, true);  // tile 0, stage 0

  float o[MF][NF][4];
#pragma unroll
  for (int i = 0; i < MF; ++i)
#pragma unroll
    for (int j = 0; j < NF; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[i][j][e] = 0.f;

  float m_run = -INFINITY, l_run = 0.f;  // softmax state of row sr (log2 domain), per thread copy
  // Rows this query row may see in this chunk: [cb, vis_end).
  const int vis_end = s_valid ? min(end - (p.S - 1 - sg / p.H), ce) : cb;
  const float scale_log2 = p.sm_scale * kLog2e;

  for (int it = 0; it < n_tiles; ++it) {
    // [X] Groups so far: Q, tiles 0..it+STAGES-2; tile it+1 must have landed.
    cp_async_wait<STAGES - 3>();
    if constexpr (kTmaK) {
      if (it + 1 < n_tiles) mbar_wait(stage_bar((it + 1) % STAGES), static_cast<uint32_t>(((it + 1) / STAGES) & 1));
    }
    __syncthreads();
    if (it == 0 && tid == 0) timeline_stamp(p, kTlDecode, kTlFirst);
    {
      const int nt = it + STAGES - 1;
      if (nt < n_tiles) load_tile(nt, nt % STAGES);
      cp_async_commit();
    }

    if constexpr (kTmaK) {
      // The split's last tile: its rows past ce hold cache rows of the next split (TMA zero-fills only past T) and
      // reach PV(it) after [Y] (their scores are masked): their latent blocks (PV reads no others) are zeroed here,
      // after the tile landed (no copy writes this stage again).
      const int tail = ce - (cb + it * N), st = it % STAGES;
      if (it == n_tiles - 1 && tail < N) {
        constexpr int LB = R / 64;
        for (int c = tid; c < (N - tail) * LB * 8; c += NTHREADS) {
          const int r = tail + c / (LB * 8), k = c % (LB * 8);  // 16-byte chunk k % 8 of row r in block k / 8
          const uint32_t off = (kv_tma - smem_addr(smem)) + st * STAGE_B + (k >> 3) * N * 128 + r * 128 + (k & 7) * 16;
          *reinterpret_cast<uint4*>(smem + off) = make_uint4(0, 0, 0, 0);
        }
      }
    }

    // ---- online softmax of row sr, columns sc..sc+CPT-1
    {
      float x[CPT];
#pragma unroll
      for (int e = 0; e < CPT; ++e) x[e] = 0.f;
#pragma unroll
      for (int d = 0; d < 4; ++d) {
        const float* src = s_part + (d * M + sr) * SP + sc;
        if constexpr (CPT == 4) {
          const float4 v = *reinterpret_cast<const float4*>(src);
          x[0] += v.x;
          x[1] += v.y;
          x[2] += v.z;
          x[3] += v.w;
        } else {
          const float2 v = *reinterpret_cast<const float2*>(src);
          x[0] += v.x;
          x[1] += v.y;
        }
      }
      const int t0 = cb + it * N + sc;
      float mx = -INFINITY;
#pragma unroll
      for (int e = 0; e < CPT; ++e) {
        x[e] = (t0 + e < vis_end) ? x[e] * scale_log2 : -INFINITY;
        mx = fmaxf(mx, x[e]);
      }
#pragma unroll
      for (int off = 1; off < TPR; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      // Lazy rescaling: keep the running max unless the tile's max exceeds it by more than 8
      // (log2 units), so P <= 2^8 (exact in bf16/fp16 range) and the PV phase can skip the
      // accumulator rescale for warps whose rows all kept their max (alpha == 1).
      const float m_new = mx > m_run + 8.f ? mx : m_run;
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      float pe[CPT], sum = 0.f;
#pragma unroll
      for (int e = 0; e < CPT; ++e) {
        pe[e] = exp2f(x[e] - m_use);
        sum += pe[e];
      }
#pragma unroll
      for (int off = 1; off < TPR; off <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      const float alpha = m_new == m_run ? 1.f : exp2f(m_run - m_use);
      l_run = l_run * alpha + sum;
      m_run = m_new;
#pragma unroll
      for (int e = 0; e < CPT; e += 2) {
        *reinterpret_cast<T2*>(s_p + sr * SP + sc + e) = Tr::pack(pe[e], pe[e + 1]);
      }
      if (s_lead) s_alpha[sr] = alpha;
    }
    __syncthreads();  // [Y]

    // ---- O *= alpha (skipped by warps whose rows all kept their max), then QK of tile it+1
    // (when there is one) and O += P V of tile it. The skip branch comes first so that the QK and
    // PV mma streams form one basic block the scheduler can interleave.
#pragma unroll
    for (int i = 0; i < MF; ++i) {
      const float a0 = s_alpha[i * 16 + gq], a1 = s_alpha[i * 16 + gq + 8];
      if (!__any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) continue;
#pragma unroll
      for (int j = 0; j < NF; ++j) {
        o[i][j][0] *= a0;
        o[i][j][1] *= a0;
        o[i][j][2] *= a1;
        o[i][j][3] *= a1;
      }
    }
    const bool has_next = it + 1 < n_tiles;
    const int st = it % STAGES;
    qk_partial(has_next ? (it + 1) % STAGES : st, has_next);
#pragma unroll
    for (int ks = 0; ks < N / 16; ++ks) {
      uint32_t pa[MF][4];
#pragma unroll
      for (int i = 0; i < MF; ++i) {
        ldsm_x4(pa[i], smem_addr(s_p + (i * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SP + ks * 16 +
                                 (lane >> 4) * 8));
      }
      const int vr = ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, vc = warp * DW + (lane >> 4) * 8;
#pragma unroll
      for (int jp = 0; jp < NF / 2; ++jp) {
        uint32_t bv[4];
        ldsm_x4_trans(bv, kv_elem(st, vr, vc + jp * 16));
#pragma unroll
        for (int i = 0; i < MF; ++i) {
          mma_16816<DT>(o[i][2 * jp], pa[i], bv[0], bv[1]);
          mma_16816<DT>(o[i][2 * jp + 1], pa[i], bv[2], bv[3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  if (tid == 0) timeline_stamp(p, kTlDecode, kTlLoopEnd);

  // ---- epilogue: normalize, write out/lse (or the split's partials)
  if (s_lead) {
    s_m[sr] = m_run;
    s_l[sr] = l_run;
    if (s_valid) {
      const float lse = l_run > 0.f ? (m_run + __log2f(l_run)) * kLn2 : -INFINITY;
      if (nsplit == 1) {
        p.lse[static_cast<size_t>(b) * MT + sg] = lse;
      } else {
        p.lse_partial[(static_cast<size_t>(b) * nsplit + split) * MT + sg] = lse;
      }
    }
  }
  __syncthreads();
  // 16-bit rows (the output, or split partials in the input dtype) leave in whole 32-byte sectors. A quad's
  // fragments hold columns 8j + 2tq, +1 of a row: 16 bytes a store in the input dtype, and a half-sector store
  // costs as much as a whole one (and may make L2 fetch the sector from DRAM to merge it: measured slower than
  // fp32 partials before this). Shuffles regroup columns 16j'..16j'+15 so thread tq stores 4tq..4tq+3 as one
  // 8-byte word (lanes q_src, q_src + 1 of the quad hold them, in fragment j = 2j' for tq < 2, else 2j' + 1).
  static_assert(NF % 2 == 0, "column fragments in pairs");
  const int q_src = (lane & ~3) | ((2 * tq) & 3);
  auto store_row16 = [&](T* row, int i, int hi, float inv, bool keep) {  // row: this warp's first column
#pragma unroll
    for (int j = 0; j < NF; j += 2) {
      T2 w[2] = {pack_out<DT>(o[i][j][2 * hi] * inv, o[i][j][2 * hi + 1] * inv),
                 pack_out<DT>(o[i][j + 1][2 * hi] * inv, o[i][j + 1][2 * hi + 1] * inv)};
      const uint32_t a = *reinterpret_cast<const uint32_t*>(&w[0]), c = *reinterpret_cast<const uint32_t*>(&w[1]);
      const uint32_t a0 = __shfl_sync(0xffffffffu, a, q_src), a1 = __shfl_sync(0xffffffffu, a, q_src + 1);
      const uint32_t c0 = __shfl_sync(0xffffffffu, c, q_src), c1 = __shfl_sync(0xffffffffu, c, q_src + 1);
      if (keep) *reinterpret_cast<uint2*>(row + 8 * j + 4 * tq) = tq < 2 ? make_uint2(a0, a1) : make_uint2(c0, c1);
    }
  };
#pragma unroll
  for (int i = 0; i < MF; ++i) {
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      const int r = i * 16 + gq + hi * 8;
      const int g = row0 + r;
      const bool real = g < MT;  // padding rows still take part in the shuffles
      const float l = s_l[r];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const size_t row = nsplit == 1 ? static_cast<size_t>(b) * MT + g : (static_cast<size_t>(b) * nsplit + split) * MT + g;
      if (nsplit > 1 && p.partial_f32) {
        float* out = static_cast<float*>(p.o_partial) + row * R + warp * DW + 2 * tq;
#pragma unroll
        for (int j = 0; j < NF; ++j) {
          if (real) *reinterpret_cast<float2*>(out + j * 8) = make_float2(o[i][j][2 * hi] * inv, o[i][j][2 * hi + 1] * inv);
        }
      } else {
        T* out = static_cast<T*>(nsplit == 1 ? p.out_latent : p.o_partial) + row * R + warp * DW;
        store_row16(out, i, hi, inv, real);
      }
    }
  }
  if (tid == 0) timeline_stamp(p, kTlDecode, kTlExit);
}

// One piece of a log-sum-exp merge of normalized rows: the running max m, weight sum and VEC accumulated columns
// move to max(m, l) (m is the same for every thread that reads the same lse), then add the piece's weight times its
// columns v (VEC partial elements in 16 bytes: fp32 when F32, else the input dtype). An empty piece (l = -inf, its
// row never written) gets weight 0 and its loaded values, which may be NaN, are discarded by a select.
template <MlaDtype DT, bool F32, int VEC>
__device__ __forceinline__ void merge_piece(float l, const uint4& v, float& m, float& wsum, float (&acc)[VEC]) {
  using Tr = DtypeTraits<DT>;
  using T2 = typename Tr::T2;
  if (l > m) {
    const float a = m == -INFINITY ? 0.f : __expf(m - l);
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] *= a;
    wsum *= a;
    m = l;
  }
  const float w = l == -INFINITY ? 0.f : __expf(l - m);
  wsum += w;
  float x[VEC];
  if constexpr (F32) {
    x[0] = __uint_as_float(v.x);
    x[1] = __uint_as_float(v.y);
    x[2] = __uint_as_float(v.z);
    x[3] = __uint_as_float(v.w);
  } else {
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = Tr::unpack(*reinterpret_cast<const T2*>(&words[k]));
      x[2 * k] = f.x;
      x[2 * k + 1] = f.y;
    }
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] += w > 0.f ? w * x[k] : 0.f;
}
// The merged columns times inv, rounded to the output dtype, as one 16-byte (8 columns) or 8-byte store.
template <MlaDtype DT, int VEC>
__device__ __forceinline__ void store_merged(typename DtypeTraits<DT>::T* out, const float (&acc)[VEC], float inv) {
  using T2 = typename DtypeTraits<DT>::T2;
  uint32_t words[VEC / 2];
#pragma unroll
  for (int k = 0; k < VEC / 2; ++k) {
    const T2 two = pack_out<DT>(acc[2 * k] * inv, acc[2 * k + 1] * inv);
    words[k] = *reinterpret_cast<const uint32_t*>(&two);
  }
  if constexpr (VEC == 8) {
    *reinterpret_cast<uint4*>(out) = make_uint4(words[0], words[1], words[2], words[3]);
  } else {
    *reinterpret_cast<uint2*>(out) = make_uint2(words[0], words[1]);
  }
}

// LSE combine of the split partials. Blocks of 128 threads; a thread takes VEC consecutive columns (one 16-byte
// load a split: 8 columns of 16-bit partials, 4 of fp32) of one output row, and JG threads of different split
// groups share those columns; a block holds RB rows x NC column threads x JG groups over a CW-column chunk.
// One pass: thread (row, group jg, column c) walks splits jg, jg + JG, ... with an online max over their lse
// (the same for every thread of a group: broadcast loads), loading DEPTH splits' lse and partial columns at
// once, so the lse and the partials are in flight together. The JG groups meet in shared memory.
// Shapes (launch_mla_combine): few rows (batch 1) take 128-column chunks and several split groups, so the many
// splits are read by more blocks and more loads are in flight; many rows take whole rows, one group, and
// DEPTH = 4 where there are at most 4 splits (at 8 the unused load slots cost registers, so fewer blocks fit
// an SM: an ncu run at H = 128, B = 16, 1K had this kernel at 10 us with 3 waves of 8-byte loads).
// Empty splits (lse = -inf, rows never written) get weight 0 and their loaded values are discarded by a select,
// never multiplied (they may be NaN).
template <MlaDtype DT, int R, int CW, int JG, bool F32, int DEPTH>
__global__ void __launch_bounds__(128) mla_combine_kernel(const MlaDecodeParams p) {
  using T = typename DtypeTraits<DT>::T;
  using PT = std::conditional_t<F32, float, T>;  // partial element (MlaDecodeParams::partial_f32)
  constexpr int VEC = 16 / static_cast<int>(sizeof(PT)), NC = CW / VEC, RB = 128 / (NC * JG), CHUNKS = R / CW;
  static_assert(R % CW == 0 && RB >= 1 && RB * NC * JG == 128, "a block is RB rows x NC columns x JG groups");
  __shared__ float2 s_mw[RB][JG];                            // (max, weight sum) of each group
  __shared__ float s_acc[RB][JG > 1 ? JG - 1 : 1][NC][VEC];  // column sums of groups 1..JG-1
  const TimelineStamp t_entry = timeline_now();
  pdl_launch_dependents();
  pdl_wait();
  const int MT = p.S * p.H;
  const int tid = threadIdx.x;
  if (tid == 0) {
    timeline_meta(p, kTlCombine, 0);
    timeline_entered(p, kTlCombine, t_entry);
  }
  const int c = tid % NC, jg = (tid / NC) % JG, rl = tid / (NC * JG);
  const long long row = static_cast<long long>(blockIdx.x / CHUNKS) * RB + rl;
  const int chunk = blockIdx.x % CHUNKS;
  const bool real = row < static_cast<long long>(p.B) * MT;  // the last block may hold fewer rows
  const long long b = real ? row / MT : 0, g = real ? row % MT : 0;
  const int ns = p.num_splits;
  const int col = chunk * CW + c * VEC;
  const size_t split_stride = static_cast<size_t>(MT) * R;
  const float* lp = p.lse_partial + b * ns * MT + g;
  const PT* op = static_cast<const PT*>(p.o_partial) + (b * ns * MT + g) * R + col;
  float m = -INFINITY, wsum = 0.f;
  float acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
  for (int j0 = jg; real && j0 < ns; j0 += DEPTH * JG) {
    float l[DEPTH];
    uint4 v[DEPTH];
#pragma unroll
    for (int u = 0; u < DEPTH; ++u) {
      const int j = j0 + u * JG;
      l[u] = j < ns ? lp[static_cast<size_t>(j) * MT] : -INFINITY;
      v[u] = j < ns ? *reinterpret_cast<const uint4*>(op + j * split_stride) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < DEPTH; ++u) merge_piece<DT, F32>(l[u], v[u], m, wsum, acc);
  }
  if constexpr (JG > 1) {
    if (c == 0) s_mw[rl][jg] = make_float2(m, wsum);
    if (jg > 0) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) s_acc[rl][jg - 1][c][k] = acc[k];
    }
    __syncthreads();
    if (jg != 0) return;
    float mx = m;
#pragma unroll
    for (int q = 1; q < JG; ++q) mx = fmaxf(mx, s_mw[rl][q].x);
    const float a0 = m == -INFINITY ? 0.f : __expf(m - mx);
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] *= a0;
    wsum *= a0;
#pragma unroll
    for (int q = 1; q < JG; ++q) {
      const float2 mw = s_mw[rl][q];
      const float a = mw.x == -INFINITY ? 0.f : __expf(mw.x - mx);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += a * s_acc[rl][q - 1][c][k];
      wsum += a * mw.y;
    }
    m = mx;
  }
  if (!real) return;
  store_merged<DT>(static_cast<T*>(p.out_latent) + row * R + col, acc, wsum > 0.f ? 1.f / wsum : 0.f);
  if (c == 0 && jg == 0 && chunk == 0) p.lse[row] = wsum > 0.f ? m + __logf(wsum) : -INFINITY;
  if (tid == 0) timeline_stamp(p, kTlCombine, kTlExit);  // thread 0's row is real: the grid has no empty block
}

// Both decode kernels (mma.sync and wgmma) finish a split launch with this, so the combine's block
// shapes are stated once. Few rows (batch 1): 128-column chunks and several split groups (H100: split groups
// took B = 1 from 16.1 to 15.5 us at H = 128, 1K, but B = 16 from 34.7 to 40.8 us); whole rows and one group
// from this many (b, query row) pairs on.
constexpr int kCombineGroupedMaxRows = 128;

// Every launch of our kernels: programmatic dependent launch when `pdl`, thread-block clusters of `cluster_x` CTAs
// along the grid's x when that is more than 1 (v8's pair kernel). Not copyable: cfg.attrs points into it.
struct LaunchConfig {
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr[2];
  LaunchConfig(dim3 grid, int threads, size_t smem, cudaStream_t stream, bool pdl, unsigned cluster_x = 1) {
    cfg.gridDim = grid;
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    unsigned n = 0;
    if (cluster_x > 1) {
      attr[n].id = cudaLaunchAttributeClusterDimension;
      attr[n].val.clusterDim.x = cluster_x;
      attr[n].val.clusterDim.y = 1;
      attr[n].val.clusterDim.z = 1;
      ++n;
    }
    if (pdl) {
      attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[n].val.programmaticStreamSerializationAllowed = 1;
      ++n;
    }
    cfg.attrs = attr;
    cfg.numAttrs = n;
  }
  LaunchConfig(const LaunchConfig&) = delete;
  LaunchConfig& operator=(const LaunchConfig&) = delete;
};

// Launches kernel(params, extra...) on `stream`, with programmatic dependent launch when params.pdl is set.
template <typename Kernel, typename... Extra>
cudaError_t launch_kernel(Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream,
                          const MlaDecodeParams& params, const Extra&... extra) {
  LaunchConfig launch(grid, threads, smem, stream, params.pdl != 0);
  return cudaLaunchKernelEx(&launch.cfg, kernel, params, extra...);
}

// The combine's shape (see mla_combine_kernel) for partial elements of `F32`.
template <MlaDtype DT, int R, bool F32>
cudaError_t launch_mla_combine_as(const MlaDecodeParams& p, cudaStream_t stream) {
  constexpr int VEC = F32 ? 4 : 8;
  const long long rows = static_cast<long long>(p.B) * p.S * p.H;
  if (rows <= kCombineGroupedMaxRows) {
    constexpr int CW = 128, JG = 128 / (CW / VEC);
    return launch_kernel(mla_combine_kernel<DT, R, CW, JG, F32, 8>, dim3(rows * (R / CW)), 128, 0, stream, p);
  }
  constexpr int RB = 128 / (R / VEC);
  const dim3 grid((rows + RB - 1) / RB);
  return p.num_splits <= 4 ? launch_kernel(mla_combine_kernel<DT, R, R, 1, F32, 4>, grid, 128, 0, stream, p)
                           : launch_kernel(mla_combine_kernel<DT, R, R, 1, F32, 8>, grid, 128, 0, stream, p);
}

// The combine launches with programmatic dependent launch like the decode kernels, at any split count. (Until
// the combine's rewrite (22e8c3c) only up to 32 splits: the early blocks of the old one, 8-byte loads and 96
// registers, packed onto the few SMs the decode kernel left free and cost 1-3 us with 64-128 splits. H200 after
// the rewrite, two rounds each: H = 128, B = 1, 4K 15.7 vs 16.5-16.6 us, 16K 24.4-24.5 vs 25.2-25.6, 64K
// 52.6-52.7 vs 53.1-54.3; H = 16, B = 1, 4K 9.3 vs 9.8-9.9.)
template <MlaDtype DT, int R>
cudaError_t launch_mla_combine(const MlaDecodeParams& p, cudaStream_t stream) {
  return p.partial_f32 ? launch_mla_combine_as<DT, R, true>(p, stream) : launch_mla_combine_as<DT, R, false>(p, stream);
}

}  // namespace mla

namespace mla {

// Lets `kernel` take `smem` bytes of dynamic shared memory on device `dev`, once per device (`done` is the
// caller's per-kernel record). The attribute is a host-side call: no stream work, fine under graph capture.
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, size_t smem, int dev, bool (&done)[64]) {
  if (dev >= 0 && dev < 64 && done[dev]) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err == cudaSuccess && dev >= 0 && dev < 64) done[dev] = true;
  return err;
}

// Launches a main decode kernel (both kernels share the grid: x = m_tile-row tile of the S*H query rows,
// y = KV split, z = sequence; 256 threads) after letting it take `smem` bytes on device `dev`.
template <typename Kernel, typename... Extra>
cudaError_t launch_main_kernel(Kernel kernel, int m_tile, size_t smem, bool (&smem_set)[64], int dev,
                               const MlaDecodeParams& params, cudaStream_t stream, const Extra&... extra) {
  const cudaError_t err = allow_dynamic_smem(kernel, smem, dev, smem_set);
  if (err != cudaSuccess) return err;
  const dim3 grid(ceil_div(params.S * params.H, m_tile), params.num_splits, params.B);
  return launch_kernel(kernel, grid, 256, smem, stream, params, extra...);
}

template <MlaDtype DT, int R, int P, int M, int STAGES>
cudaError_t launch_variant(const MlaDecodeParams& params, cudaStream_t stream, int dev) {
  static bool smem_set[64] = {};
  return launch_main_kernel(mla_decode_kernel<DT, R, P, M, STAGES>, M, mla_decode_smem_bytes(R, P, M, STAGES),
                            smem_set, dev, params, stream, NoMaps{});
}

// The TMAQ variant (the deep pipeline only: sm_90a parts have the shared memory) with its query maps, and with the
// cache's maps where TMAK; false in *launched where they do not encode.
template <MlaDtype DT, int R, int P, int M, bool TMAK>
cudaError_t launch_variant_tma(const MlaDecodeParams& params, cudaStream_t stream, int dev, bool* launched) {
  static bool smem_set[64] = {};
  *launched = false;
  KernelMaps<false, true, TMAK> maps;
  if constexpr (TMAK) {
    if (!tile_maps<DT, M, kMlaNTile>(params, R, P, true, &maps)) return cudaSuccess;
  } else {
    if (!query_maps<DT, M>(params, R, P, &maps)) return cudaSuccess;
  }
  *launched = true;
  return launch_main_kernel(mla_decode_kernel<DT, R, P, M, kMlaMaxStages, true, TMAK>, M,
                            mla_decode_smem_bytes(R, P, M, kMlaMaxStages, true), smem_set, dev, params, stream, maps);
}

}  // namespace mla

template <MlaDtype DT, int R, int P>
cudaError_t launch_mla_decode(const MlaDecodeParams& params, cudaStream_t stream, bool* q_by_tma, bool* kv_by_tma) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (q_by_tma != nullptr) *q_by_tma = false;
  if (kv_by_tma != nullptr) *kv_by_tma = false;
  static int smem_optin[64] = {};
  int optin = dev >= 0 && dev < 64 ? smem_optin[dev] : 0;
  if (optin == 0) {
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (err != cudaSuccess) return err;
    if (dev >= 0 && dev < 64) smem_optin[dev] = optin;
  }
  const bool deep = static_cast<size_t>(optin) >= mla_decode_smem_bytes(R, P, 32, kMlaMaxStages);
  const int m = mla_decode_m_tile(params.S, params.H);
  const bool small_m = m == 16;
  bool launched = false;
  if constexpr (R == 512 && P == 64) {
    // The query tile by TMA where it serves (params.tma_q: the switch, set only where the sm_90a body is loaded)
    // and the maps encode, and the cache tiles too where params.tma_kv (the switch); else all by cp.async.
    if (params.tma_q && mla_decode_tma_q_serves(R, P, params.S, params.H, m) &&
        static_cast<size_t>(optin) >= mla_decode_smem_bytes(R, P, m, kMlaMaxStages, true)) {
      if (params.tma_kv) {
        err = small_m ? mla::launch_variant_tma<DT, R, P, 16, true>(params, stream, dev, &launched)
                      : mla::launch_variant_tma<DT, R, P, 32, true>(params, stream, dev, &launched);
        if (kv_by_tma != nullptr) *kv_by_tma = launched;
      }
      if (!launched && err == cudaSuccess) {
        err = small_m ? mla::launch_variant_tma<DT, R, P, 16, false>(params, stream, dev, &launched)
                      : mla::launch_variant_tma<DT, R, P, 32, false>(params, stream, dev, &launched);
      }
      if (q_by_tma != nullptr) *q_by_tma = launched;
    }
  }
  if (!launched) {
    if (small_m) {
      err = deep ? mla::launch_variant<DT, R, P, 16, kMlaMaxStages>(params, stream, dev)
                 : mla::launch_variant<DT, R, P, 16, kMlaMinStages>(params, stream, dev);
    } else {
      err = deep ? mla::launch_variant<DT, R, P, 32, kMlaMaxStages>(params, stream, dev)
                 : mla::launch_variant<DT, R, P, 32, kMlaMinStages>(params, stream, dev);
    }
  }
  if (err != cudaSuccess || params.num_splits == 1) return err;
  return mla::launch_mla_combine<DT, R>(params, stream);
}
