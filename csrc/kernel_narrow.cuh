// The narrow kernel of the absorbed MLA decode (sm_90a; v9 in docs/HISTORY.md): few query rows (S*H <= 16; H = 16
// at one token) as the N dimension of wgmma, and its launcher. Same contract and split-KV convention as mma_kernel
// (kernel_mma.cuh), and the same LSE combine.
//
// Why: seesaw puts the query rows on wgmma's M, which is 64: at H = 16 three quarters of its products are padding,
// and its late order (kSeesawLateMaxRows) sits near the tensor limit and the memory limit at once. Here the cache rows
// are M and the heads N (m64n16k16), so the tensor work is the real work:
//   S^T [64 rows x 16 heads] = K [64 x 576] Q^T        (36 k-steps; A = the cache tile as landed, B = Q, K-major)
//   softmax per head = per column of S^T               (its 64 rows span the warpgroup's 4 warps)
//   O^T [512 x 16] += V^T [512 x 64] P^T [64 x 16]     (8 m-blocks x 4 k-steps; A = the same tile read M-major)
// Grid: x = 16-row tile of the S*H query rows (one where S*H <= 16), y = KV split, z = sequence; 256 threads.
// Warpgroup w takes tiles w, w + 2, ... of the CTA's rows [cb, ce) through buffer w of its own, copied by TMA (one
// thread, nine 64-row boxes, each on its 64-column block's mbarrier), reloaded once its PV is done; each keeps its
// own running max m (lazy: moves only past m + 8 in log2, as seesaw), row sums and O^T (64 fp32 accumulators a thread),
// and the two merge through shared memory at the end. (Its loop runs at the HBM rate, as seesaw's late order's: what
// it gains is outside the loop; docs/KERNEL.md.)
// Shared memory (1024-aligned, 128-byte swizzle as seesaw: 16-byte chunk c of a 128-byte row r at chunk c ^ (r % 8)):
// Q [NB][16][64], buffers 0 and 1 [NB][64][64], P^T [2][16 heads][64 rows], the softmax exchange, an mbarrier a
// 64-column block of each buffer.
#pragma once

#include "combine.cuh"
#include "common.cuh"
#include "kernels.h"
#include "sm90_tma.cuh"
#include "sm90_wgmma.cuh"
#include "tensor_maps.h"

namespace mla {

template <MlaDtype DT, int R, int P>
__global__ void __launch_bounds__(256, 1) narrow_kernel(const MlaDecodeParams p, const __grid_constant__ CacheMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename DtypeTraits<DT>::T;
  constexpr int M = kMlaNarrowMTile, N = kMlaSeesawNTile, NB = wgmma_col_blocks(R, P), LB = R / 64;
  constexpr int BLK = N * 128, TILE = NB * BLK, QBLK = M * 128, CHUNKS = (R + P) / 8;
  constexpr int SROW = R + 4;  // fp32 staging row of the epilogue: 4 floats of padding, conflict-free writes
  static_assert(R == 512 && P == 64 && M == 16 && N == 64, "128-byte rows in every block (the TMA swizzle), 16 heads");
  static_assert(narrow_smem_bytes(R, P) == 1024 + NB * QBLK + 2 * TILE + 2 * QBLK + 2048 + 2 * NB * 8, "layout");
  static_assert(M * SROW * 4 <= TILE, "the epilogue stages a warpgroup's rows in its buffer");

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t s_q = (raw + 1023) & ~1023u;
  const uint32_t s_buf0 = s_q + NB * QBLK;  // 1024-aligned: QBLK is 2 KB
  const uint32_t s_pt0 = s_buf0 + 2 * TILE;
  const uint32_t s_x = s_pt0 + 2 * QBLK;    // exchange: [2 wg][2 parity][4 warps][16] maxima, then the epilogue's
  const uint32_t s_mbar = s_x + 2048;       // 2 x NB mbarriers: block j of buffer w landed (at 8 (w NB + j))
  auto at = [&](uint32_t addr) { return smem_raw + (addr - raw); };
  float* xch = reinterpret_cast<float*>(at(s_x));

  const int tid = threadIdx.x, wt = tid & 127, lane = tid & 31, warp = wt >> 5, tq = lane & 3, gq = lane >> 2;
  // Warp-uniform in the compiler's eyes (a shuffle from lane 0): see seesaw_kernel.
  const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
  const int b = blockIdx.z, split = blockIdx.y, nsplit = p.num_splits, MT = p.S * p.H, row0 = blockIdx.x * M;

  const TimelineStamp t_entry = timeline_now();
  pdl_launch_dependents();
  pdl_wait();
  if (tid == 0) timeline_entered(p, kTlDecode, t_entry);
  const int start_raw = p.kv_start[b], end_raw = p.kv_end[b];
  // Q: 16 rows (past S*H zero-filled, so their scores are 0 and masked), swizzled, by all threads.
  for (int i = tid; i < M * CHUNKS; i += 256) {
    const int r = i / CHUNKS, cc = i % CHUNKS;
    cp_async_16(s_q + (cc >> 3) * QBLK + r * 128 + (((cc & 7) ^ (r & 7)) << 4),
                query_chunk_src<T, R>(p, b, row0 + r, cc), row0 + r < MT);
  }
  cp_async_commit();
  // This CTA's rows: the visible range cut into num_splits chunks of whole pairs of tiles (seesaw's cut).
  const int start = max(start_raw, 0), end = min(end_raw, p.T), len = max(end - start, 0);
  const int per = ceil_div(ceil_div(len, nsplit), 2 * N) * 2 * N;
  const long long cb_l = static_cast<long long>(start) + static_cast<long long>(split) * per;
  const int cb = static_cast<int>(cb_l < end ? cb_l : end);
  const int ce = static_cast<int>(min(cb_l + per, static_cast<long long>(end)));
  const int n_tiles = ce > cb ? ceil_div(ce - cb, N) : 0;
  if (tid == 0) timeline_meta(p, kTlDecode, n_tiles);
  if (n_tiles == 0) {
    cp_async_wait<0>();  // the Q copy lands before the CTA exits
    write_empty_split<T, R, M>(p, tid, b, split, nsplit, MT, row0);
    return;
  }
  if (tid == 0) timeline_stamp(p, kTlDecode, kTlLengths);
  if (tid == 0) {
#pragma unroll
    for (int i = 0; i < 2 * NB; ++i) mbar_init(s_mbar + 8 * i, 1);
    fence_mbarrier_init();  // visible to the copy engine before its bytes arrive
  }
  __syncthreads();

  const uint32_t buf = s_buf0 + wg * TILE, bar = s_mbar + 8 * wg * NB, pt = s_pt0 + wg * QBLK;
  const int bar_wg = wg == 0 ? kBarWg0 : kBarWg1;
  // Tile `tile` of the CTA's rows into this warpgroup's buffer: nine 64-row boxes (TMA zero-fills past T only), each
  // on its block's mbarrier, so QK starts on the first block while the rest lands (as seesaw's tiles).
  auto load_tile = [&](int tile) {
    fence_proxy_async();  // this buffer's earlier generic writes (a zeroed tail) before the copy
    const int row = cb + tile * N;
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      mbar_arrive_expect_tx(bar + 8 * j, BLK);
      if (j < LB) {
        tma_load_3d(buf + j * BLK, &maps.c_kv, j * 64, row, b, bar + 8 * j);
      } else {
        tma_load_3d(buf + j * BLK, &maps.k_pe, 0, row, b, bar + 8 * j);
      }
    }
  };
  if (wt == 0 && wg < n_tiles) load_tile(wg);
  cp_async_wait<0>();
  fence_proxy_async();
  __syncthreads();  // every thread's part of Q landed and is visible to the tensor cores
  if (kTimelinePhases && tid == 0) timeline_stamp(p, kTlDecode, kTlQ);

  // Fragment i of an m64n16 accumulator: row 16 warp + gq + 8 ((i >> 1) & 1), column 8 (i >> 2) + 2 tq + (i & 1).
  // This thread's four columns (query rows) k = 0..3 are col(k) = 8 (k >> 1) + 2 tq + (k & 1); fragment i is column
  // kcol(i) and fragments kfrag(k) and kfrag(k) + 2 hold column k's two rows.
  auto col = [&](int k) { return 8 * (k >> 1) + 2 * tq + (k & 1); };
  auto kcol = [](int i) { return ((i >> 2) << 1) | (i & 1); };
  auto kfrag = [](int k) { return ((k >> 1) << 2) | (k & 1); };
  const int r0 = warp * 16 + gq;  // this thread's first tile row (and latent column within an m-block of O^T)
  int vis[4];                     // query row col(k) sees cache rows [cb, vis[k]): causal among the S new tokens
  float m[4], lsum[4];            // running max (log2) and this thread's share of the row sums, per column
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int g = row0 + col(k);
    vis[k] = g < MT ? min(end - (p.S - 1 - g / p.H), ce) : cb;
    m[k] = -INFINITY;
    lsum[k] = 0.f;
  }
  float o[LB][8];
#pragma unroll
  for (int j = 0; j < LB; ++j)
#pragma unroll
    for (int i = 0; i < 8; ++i) o[j][i] = 0.f;
  float s[8];
  const float scale_log2 = p.sm_scale * kLog2e;
  const uint32_t q_lo = smem_desc_lo(s_q, 16), k_lo = smem_desc_lo(buf, 16), pt_lo = smem_desc_lo(pt, 16);
  unsigned char* const pt_ptr = at(pt);

  int n = 0;  // this warpgroup's tiles so far (the buffer's phase)
  for (int tile = wg; tile < n_tiles; tile += 2, ++n) {
    const uint32_t parity = static_cast<uint32_t>(n & 1);
    const int keep = ce - (cb + tile * N);
    if (keep < N) {
      // A split's last tile: rows past ce are real (or NaN) cache rows. Softmax masks their scores, but PV would
      // multiply P = 0 by them: once its latent blocks landed, zero their rows for the tensor cores (seesaw's
      // zero_tail; the block waits below then return at once).
#pragma unroll
      for (int j = 0; j < LB; ++j) mbar_wait(bar + 8 * j, parity);
      unsigned char* base = at(buf);
      const int chunks = (N - keep) * 8;
      for (int i = wt; i < LB * chunks; i += 128) {
        *reinterpret_cast<uint4*>(base + (i / chunks) * BLK + keep * 128 + (i % chunks) * 16) = make_uint4(0, 0, 0, 0);
      }
      fence_proxy_async();
      named_bar_sync(bar_wg, 128);
    }
    // S^T = K Q^T: the tile and Q share the block layout (Q's blocks are 16 rows).
    fence_operand(s);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < NB * 4; ++j) {
      if (j % 4 == 0) {
        mbar_wait(bar + 8 * (j / 4), parity);
        wgmma_fence();  // explicit, after the wait loop's branches (ptxas would inject one, C7519)
      }
      const uint32_t koff = ((j / 4) * BLK + (j % 4) * 32) >> 4, qoff = ((j / 4) * QBLK + (j % 4) * 32) >> 4;
      wgmma_ss_m64n16<DT, 0>(s, smem_desc_kmajor(k_lo + koff), smem_desc_kmajor(q_lo + qoff), j > 0 ? 1 : 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operand(s);
    if (kTimelinePhases && n == 0 && tid == 0) timeline_stamp(p, kTlDecode, kTlFirst);

    // Softmax per column: mask, scale, the column max over the tile's 64 rows (8 lanes of a warp by shuffles, the
    // warpgroup's 4 warps through shared memory, double-buffered by tile parity).
    const int t0 = cb + tile * N + r0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int t = t0 + ((i & 2) ? 8 : 0);
      s[i] = t < vis[kcol(i)] ? s[i] * scale_log2 : -INFINITY;
    }
    float mx[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      mx[k] = fmaxf(s[kfrag(k)], s[kfrag(k) + 2]);
#pragma unroll
      for (int off = 4; off < 32; off <<= 1) mx[k] = fmaxf(mx[k], __shfl_xor_sync(0xffffffffu, mx[k], off));
    }
    float* xm = xch + ((wg * 2 + (n & 1)) * 4) * 16;
    if (gq == 0) {
#pragma unroll
      for (int k = 0; k < 4; ++k) xm[warp * 16 + col(k)] = mx[k];
    }
    named_bar_sync(bar_wg, 128);
    float a[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int c = col(k);
      const float x = fmaxf(fmaxf(xm[c], xm[16 + c]), fmaxf(xm[32 + c], xm[48 + c]));
      const float mn = x > m[k] + 8.f ? x : m[k];
      a[k] = mn == m[k] ? 1.f : exp2f(m[k] - (mn == -INFINITY ? 0.f : mn));
      m[k] = mn;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float mu = m[kcol(i)] == -INFINITY ? 0.f : m[kcol(i)];
      s[i] = exp2f(s[i] - mu);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) lsum[k] = lsum[k] * a[k] + s[kfrag(k)] + s[kfrag(k) + 2];
    if (__any_sync(0xffffffffu, a[0] != 1.f || a[1] != 1.f || a[2] != 1.f || a[3] != 1.f)) {
#pragma unroll
      for (int j = 0; j < LB; ++j)
#pragma unroll
        for (int i = 0; i < 8; ++i) o[j][i] *= a[kcol(i)];
    }
    // P^T [16 heads][64 rows] in the input dtype, K-major (a head's 64 rows in one 128-byte row, swizzled).
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int c = col(kcol(i)), r = r0 + ((i & 2) ? 8 : 0);
      T v;
      if constexpr (DT == MlaDtype::kBF16) {
        v = __float2bfloat16_rn(s[i]);
      } else {
        v = __float2half_rn(s[i]);
      }
      *reinterpret_cast<T*>(pt_ptr + c * 128 + (((r >> 3) ^ (c & 7)) << 4) + (r & 7) * 2) = v;
    }
    fence_proxy_async();
    named_bar_sync(bar_wg, 128);  // the whole P^T is written and visible to the tensor cores

    // O^T += V^T P^T: m-block j = latent columns [64 j, 64 j + 64) of the tile, read M-major; k-step ks = rows 16 ks..
    fence_operand(o);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < LB; ++j) {
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        wgmma_ss_m64n16<DT, 1>(o[j], smem_desc(buf + j * BLK + ks * 16 * 128, BLK, 1024),
                               smem_desc_kmajor(pt_lo + ((ks * 32) >> 4)), 1);
      }
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operand(o);
    named_bar_sync(bar_wg, 128);  // the warpgroup's products over this buffer (and P^T) are done
    if (wt == 0 && tile + 2 < n_tiles) load_tile(tile + 2);
  }

  if (kTimelinePhases && wt == 0) timeline_stamp(p, kTlDecode, wg == 0 ? kTlLoopEnd : kTlLoopEnd1);

  // ---- epilogue: each warpgroup's column sums and max, merged; each stages its O^T scaled to the common max and
  // divided by the sum (fp32, in its own buffer), and all threads store the sums of both stagings by rows.
  float* xl = xch;             // [2 wg][4 warps][16] column sums
  float* xmax = xch + 2 * 64;  // [2 wg][16] column maxima
#pragma unroll
  for (int k = 0; k < 4; ++k) {
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) lsum[k] += __shfl_xor_sync(0xffffffffu, lsum[k], off);
  }
  named_bar_sync(kBarEnd, 256);  // both loops are done with the exchange's maxima
  if (gq == 0) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      xl[(wg * 4 + warp) * 16 + col(k)] = lsum[k];
      if (warp == 0) xmax[wg * 16 + col(k)] = m[k];
    }
  }
  named_bar_sync(kBarEnd, 256);
  float scale[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int c = col(k);
    const float m0 = xmax[c], m1 = xmax[16 + c], mt = fmaxf(m0, m1);
    const float f0 = m0 == -INFINITY ? 0.f : exp2f(m0 - mt), f1 = m1 == -INFINITY ? 0.f : exp2f(m1 - mt);
    const float l0 = xl[c] + xl[16 + c] + xl[32 + c] + xl[48 + c];
    const float l1 = xl[64 + c] + xl[80 + c] + xl[96 + c] + xl[112 + c];
    const float l = l0 * f0 + l1 * f1;
    scale[k] = l > 0.f ? (wg == 0 ? f0 : f1) / l : 0.f;
    const int g = row0 + c;
    if (wg == 0 && warp == 0 && gq == 0 && g < MT) {
      const float lse = l > 0.f ? (mt + __log2f(l)) * kLn2 : -INFINITY;
      float* dst = nsplit == 1 ? p.lse + static_cast<size_t>(b) * MT
                               : p.lse_partial + (static_cast<size_t>(b) * nsplit + split) * MT;
      dst[g] = lse;
    }
  }
  float* stage = reinterpret_cast<float*>(at(buf));  // [16 heads][SROW]: free (no copy was issued past the last tile)
#pragma unroll
  for (int j = 0; j < LB; ++j) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      stage[col(kcol(i)) * SROW + j * 64 + r0 + ((i & 2) ? 8 : 0)] = o[j][i] * scale[kcol(i)];
    }
  }
  named_bar_sync(kBarOut, 256);
  const float* st0 = reinterpret_cast<const float*>(at(s_buf0));
  const float* st1 = reinterpret_cast<const float*>(at(s_buf0 + TILE));
  const size_t out_row = nsplit == 1 ? static_cast<size_t>(b) * MT : (static_cast<size_t>(b) * nsplit + split) * MT;
  for (int i = tid; i < M * (R / 8); i += 256) {
    const int r = i / (R / 8), c8 = (i % (R / 8)) * 8;
    if (row0 + r >= MT) continue;
    float v[8];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float4 x = *reinterpret_cast<const float4*>(st0 + r * SROW + c8 + 4 * h);
      const float4 y = *reinterpret_cast<const float4*>(st1 + r * SROW + c8 + 4 * h);
      v[4 * h] = x.x + y.x;
      v[4 * h + 1] = x.y + y.y;
      v[4 * h + 2] = x.z + y.z;
      v[4 * h + 3] = x.w + y.w;
    }
    const size_t at_out = (out_row + row0 + r) * R + c8;
    const auto p0 = pack_out<DT>(v[0], v[1]), p1 = pack_out<DT>(v[2], v[3]);
    const auto p2 = pack_out<DT>(v[4], v[5]), p3 = pack_out<DT>(v[6], v[7]);
    T* dst = static_cast<T*>(nsplit == 1 ? p.out_latent : p.o_partial) + at_out;
    *reinterpret_cast<uint4*>(dst) =
        make_uint4(*reinterpret_cast<const uint32_t*>(&p0), *reinterpret_cast<const uint32_t*>(&p1),
                   *reinterpret_cast<const uint32_t*>(&p2), *reinterpret_cast<const uint32_t*>(&p3));
  }
  if (tid == 0) timeline_stamp(p, kTlDecode, kTlExit);
#else
  // Built without sm_90a: never dispatched (sm90a_kernels_built); fail loudly if it is.
  __trap();
#endif
}

}  // namespace mla

// Seesaw where the cache's tensor maps do not encode (every narrow tile goes by TMA).
template <MlaDtype DT, int R, int P>
cudaError_t launch_narrow(const MlaDecodeParams& params, cudaStream_t stream, Launched* ran) {
  static_assert(R == 512 && P == 64, "narrow_serves");
  mla::CacheMaps maps;
  if (!params.tma || !mla::cache_maps<DT, kMlaSeesawNTile>(params, R, P, &maps)) {
    return launch_seesaw<DT, R, P>(params, stream, ran);
  }
  *ran = Launched{Kernel::kNarrow, false, true};
  static bool smem_set[64] = {};
  const cudaError_t err = mla::launch_main_kernel(mla::narrow_kernel<DT, R, P>, kMlaNarrowMTile,
                                                  narrow_smem_bytes(R, P), smem_set, params, stream, maps);
  if (err != cudaSuccess || params.num_splits == 1) return err;
  return mla::launch_combine<DT, R>(params, stream);
}
