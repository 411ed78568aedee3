// The mma.sync kernel of the absorbed MLA decode (every GPU from sm_80) and its launcher.
//
// Math (see mla_patch/reference.py): for sequence b and query row g = s * H + h,
//   score[t] = (q_latent[g] . c_kv[t] + q_pe[g] . k_pe[t]) * sm_scale   for visible rows t,
//   out[g]   = softmax(score) @ c_kv,   lse[g] = log(sum exp(score)).
// All S*H query rows of a sequence share one cache (one latent KV head), so a CTA treats
// kMlaMTile of them as the M dimension of a small GEMM against each cache tile and reads
// every cache row once per M tile (H = 128 has 4 M tiles, launched adjacently so the
// repeats hit L2), instead of once per head.
#pragma once

#include "combine.cuh"
#include "common.cuh"
#include "kernels.h"
#include "sm90_tma.cuh"
#include "tensor_maps.h"

namespace mla {


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
// TMAQ (sm_90a, R = 512, mma_tma_serves): the Q tile comes instead by TMA, issued by one thread (the
// query maps' box: M heads of one token a 64-column block), into its own region after those ([9][M][128 B],
// 128-byte swizzle, 1 KB aligned; OOB heads read as zeros) onto an mbarrier. The cp.async copy kept every thread
// issuing its 16-byte copies for ~1.7 us before it could issue the first cache tile's (kernel_timeline.py at
// H = 128, batch 1: pdl_wait -> lengths 2.45 us here against seesaw's 0.76 with its query by TMA).
// TMAK (with TMAQ): the cache tiles by TMA too, one thread issuing nine {64 columns, 32 rows} boxes a tile onto the
// stage's mbarrier, the stages in the same 128-byte-swizzled block layout inside the region of the padded ones;
// TMA reads rows past T as zeros, and the rows in [ce, T) of a split's last tile are zeroed after it lands.
// PAGED: a paged cache (params.row_index): each cache row's address comes from the row table; cp.async only.
template <MlaDtype DT, int R, int P, int M, int STAGES, bool TMAQ = false, bool TMAK = false, bool PAGED = false>
__global__ void __launch_bounds__(256, 1)
    mma_kernel(const MlaDecodeParams p, const __grid_constant__ KernelMaps<TMAQ, TMAK> maps) {
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
  static_assert(!(PAGED && TMAK), "a paged cache's rows go by cp.async");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kTmaQ = TMAQ, kTmaK = TMAK;
#else
  constexpr bool kTmaQ = false, kTmaK = false;
  if constexpr (TMAQ) __trap();  // never launched without the sm_90a body (launch_mma)
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
  // flight fill up (4.5 us for seesaw's 73 KB a CTA at batch 1, kernel_timeline.py on the H200), and the lengths'
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
      const int s = row0 / p.H, h0 = row0 % p.H;  // the tile is M heads of token s (mma_tma_serves)
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
    if constexpr (PAGED) {  // the same chunks, each row at its pool row
#pragma unroll
      for (int k = 0; k < LPASS; ++k) {
        const int r = l_row + k * LROWS;
        const bool valid = base + r < ce;
        const T* src = valid ? c_kv + pool_row(p, b, base + r) * p.c_kv_st + l_col : c_kv;
        cp_async_16(smem_addr(dst + r * ROW + l_col), src, valid);
      }
      if (r_active) {
        const bool valid = base + r_row < ce;
        const T* src = valid ? k_pe + pool_row(p, b, base + r_row) * p.k_pe_st + r_col : k_pe;
        cp_async_16(smem_addr(dst + r_row * ROW + R + r_col), src, valid);
      }
      return;
    }
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
  // fp32 partials). Shuffles regroup columns 16j'..16j'+15 so thread tq stores 4tq..4tq+3 as one
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
      T* out = static_cast<T*>(nsplit == 1 ? p.out_latent : p.o_partial) + row * R + warp * DW;
      store_row16(out, i, hi, inv, real);
    }
  }
  if (tid == 0) timeline_stamp(p, kTlDecode, kTlExit);
}

}  // namespace mla

namespace mla {

template <MlaDtype DT, int R, int P, int M, int STAGES>
cudaError_t launch_mma_cp_async(const MlaDecodeParams& params, cudaStream_t stream) {
  static bool smem_set[64] = {}, paged_smem_set[64] = {};
  constexpr size_t smem = mma_smem_bytes(R, P, M, STAGES);
  if (params.row_index != nullptr) {
    return launch_main_kernel(mma_kernel<DT, R, P, M, STAGES, false, false, true>, M, smem, paged_smem_set, params,
                              stream, NoMaps{});
  }
  return launch_main_kernel(mma_kernel<DT, R, P, M, STAGES>, M, smem, smem_set, params, stream, NoMaps{});
}

// The query and cache tiles by TMA (the deep pipeline only: sm_90a parts have the shared memory); false in *launched
// where the maps do not encode.
template <MlaDtype DT, int R, int P, int M>
cudaError_t launch_mma_tma(const MlaDecodeParams& params, cudaStream_t stream, bool* launched) {
  static bool smem_set[64] = {};
  *launched = false;
  TileMaps maps;
  if (!tile_maps<DT, M, kMlaNTile>(params, R, P, true, &maps)) return cudaSuccess;
  *launched = true;
  return launch_main_kernel(mma_kernel<DT, R, P, M, kMlaMaxStages, true, true>, M,
                            mma_smem_bytes(R, P, M, kMlaMaxStages, true), smem_set, params, stream, maps);
}

// The opt-in shared memory per block of the current device, read once per device.
inline cudaError_t device_smem_optin(int* optin) {
  static int cache[64] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < 64 && cache[dev] != 0) {
    *optin = cache[dev];
    return cudaSuccess;
  }
  err = cudaDeviceGetAttribute(optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err == cudaSuccess && dev >= 0 && dev < 64) cache[dev] = *optin;
  return err;
}

}  // namespace mla

// TMA tiles where params.tma (set only where the sm_90a bodies are loaded and the cache is not paged), the shapes
// serve and the maps encode; else cp.async, 4 stages where the shared memory allows.
template <MlaDtype DT, int R, int P>
cudaError_t launch_mma(const MlaDecodeParams& params, cudaStream_t stream, Launched* ran) {
  *ran = Launched{Kernel::kMma, false, false};
  int optin = 0;
  cudaError_t err = mla::device_smem_optin(&optin);
  if (err != cudaSuccess) return err;
  const int m = mma_m_tile(params.S, params.H);
  bool launched = false;
  if constexpr (R == 512 && P == 64) {
    if (params.tma && mma_tma_serves(R, P, params.S, params.H) &&
        static_cast<size_t>(optin) >= mma_smem_bytes(R, P, m, kMlaMaxStages, true)) {
      err = m == 16 ? mla::launch_mma_tma<DT, R, P, 16>(params, stream, &launched)
                    : mla::launch_mma_tma<DT, R, P, 32>(params, stream, &launched);
      ran->q_tma = ran->kv_tma = launched;
    }
  }
  if (!launched && err == cudaSuccess) {
    const bool deep = static_cast<size_t>(optin) >= mma_smem_bytes(R, P, 32, kMlaMaxStages);
    if (m == 16) {
      err = deep ? mla::launch_mma_cp_async<DT, R, P, 16, kMlaMaxStages>(params, stream)
                 : mla::launch_mma_cp_async<DT, R, P, 16, kMlaMinStages>(params, stream);
    } else {
      err = deep ? mla::launch_mma_cp_async<DT, R, P, 32, kMlaMaxStages>(params, stream)
                 : mla::launch_mma_cp_async<DT, R, P, 32, kMlaMinStages>(params, stream);
    }
  }
  if (err != cudaSuccess || params.num_splits == 1) return err;
  return mla::launch_combine<DT, R>(params, stream);
}
