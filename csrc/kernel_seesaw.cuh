// The seesaw kernel of the absorbed MLA decode (sm_90a; v7 in docs/HISTORY.md): wgmma with 64 query rows a CTA
// and 64-row cache tiles taken in pairs, and its launcher. Same contract and split-KV convention as mma_kernel
// (kernel_mma.cuh), and the same LSE combine.
//
// Why: v6 cut QK of every 32-row tile across both warpgroups, summed the halves through shared memory and
// ran one softmax, so each tile was a serial chain (QK on both, exchange, softmax, PV) and QK re-read
// the 72 KB query tile for every 32 cache rows (m64n32k16: 192 B of operands a clock against 128 B/clk
// of shared-memory bandwidth). Here each warpgroup computes whole 64-row tiles (m64n64k16: 128 B/clk)
// with its own softmax, and the two warpgroups take turns on the tensor cores (the schedule DeepSeek's
// FlashMLA calls "seesaw"; this is our own take on it).
//
// Grid: x = 64-row tile of the S*H query rows (H = 128 has 2, adjacent, so the second read of each cache
// tile is an L2 hit), y = KV split, z = sequence. Block: 256 threads = warpgroups 0 and 1.
// The CTA's rows [cb, ce) are cut into 64-row tiles; tile t goes to buffer t % 2 and warpgroup t % 2.
// Pairs (tiles 2k, 2k + 1) share one running row max m (the lazy rescale of v3: m moves only when a
// tile's max exceeds it by 8 in log2). Warpgroup w owns output columns [w R/2, (w+1) R/2) of all 64
// query rows (128 fp32 accumulators a thread for R = 512). Per pair, with a = tile 2k, b = tile 2k+1:
//   wg0: S_a = Q K_a^T (36 k-steps) | softmax: m_a = max(m, rowmax S_a), P_a -> slots, m_a -> slot A
//        | O_L *= 2^(m - m_a); O_L += P_a V_a,L | (wait for wg1) O_L *= 2^(m_a - m_b); O_L += P_b V_b,L
//   wg1: S_b = Q K_b^T | (wait for m_a, P_a) O_R *= 2^(m - m_a); O_R += P_a V_a,R | softmax: m_b =
//        max(m_a, rowmax S_b), P_b -> slots, m_b | O_R *= 2^(m_a - m_b); O_R += P_b V_b,R
// (with few real query rows, S*H <= 32, the LATE order below runs wg1's QK_b after P_a V_a,R instead)
// so wg0's softmax runs under wg1's QK and wg1's softmax under both PVs over buffer 0, which therefore
// frees up (and is reloaded) early in the pair; wg0 queues the next pair's QK before it waits for its
// last PV. Both PVs take P from
// registers (wgmma RS); the other warpgroup's P arrives through per-thread slots in the rope block of
// its tile (free once that tile's QK is done): thread t of either warpgroup holds the same fragment
// positions, so slot t needs no relayout.
// Loads: cp.async (16-byte chunks, zero-filled outside [cb, ce), so NaN rows never reach a product)
// completing on mbarriers, one a 64-column block, copied block by block so QK starts on a tile's first block
// while the rest still lands. Each buffer has two parts: "self" = the V columns of its own warpgroup,
// read only by that warpgroup, and "cross" = the other V half plus the rope block (P slots), last read
// by the other warpgroup's PV. Warpgroup w reloads the columns [w R/2, (w+1) R/2) of a buffer (and, for
// the other buffer, its rope block) as soon as its PV over that buffer is done, so the next pair's
// loads are in flight while the current pair computes; QK issues its self part before it waits for the
// cross part, which lands last. A missing partner of an odd last tile is a zero tile (fully masked).
// Shared memory (1024-aligned; 128-byte swizzle: 16-byte chunk c of a 128-byte row r at chunk c ^ (r % 8),
// the layout wgmma reads): Q [NB][64][64], buffer 0 and 1 [NB][64][64] (NB = R/64 latent blocks + one rope
// block), m slots A and B [128] float2, l slots [2][128] float2, mbarriers (seesaw_mbarriers).
// Where R = 512 its cache tiles go by TMA (TMAK), and where H is also a multiple of 64 its query tile (TMAQ).
#pragma once

#include <array>
#include <type_traits>

#include "combine.cuh"
#include "common.cuh"
#include "kernels.h"
#include "sm90_tma.cuh"
#include "sm90_wgmma.cuh"
#include "tensor_maps.h"

namespace mla {

// Everything both warpgroups' programs need: set up once by the kernel.
struct SeesawCtx {
  // Shared addresses: the mbarrier of 64-column block j of buffer u at s_mbar + 8 (u NB + j) (the self part's
  // blocks first, then the cross part's, rope last).
  uint32_t s_q, s_buf[2], s_mbar;
  unsigned char* smem;             // generic pointer of shared address 0 offset (smem + addr - base)
  uint32_t smem_base;
  float2 *slot_ma, *slot_mb, *slot_l;  // [128], [128], [2][128]
  int cb, ce, n_pairs;
  int vis0, vis1;  // rows of this thread's fragments see cache rows [cb, vis)
  int g0, g1;      // their query rows (>= MT: padding)
  int b, split, MT, nsplit, row0;
  float scale_log2;
  // With its cache tiles by TMA (TMAK): the cache's tensor maps (in the __grid_constant__ parameter).
  const CUtensorMap* map_kv;
  const CUtensorMap* map_pe;
  uint32_t s_qbar;  // with its query tile by TMA (TMAQ): the mbarrier the tile lands on
};

// The two parts of a tile buffer: the self part of buffer u is reloaded by warpgroup u, the cross part by
// warpgroup 1 - u (each completes on its own mbarrier).
enum SeesawPart : int { kSelf = 0, kCross = 1 };

// LATE: the order for few real query rows. wg1 runs P_a V_a,R before QK_b instead of after it, so the reload of
// tile b (issued as the previous pair ends) has QK_a, softmax_a and both PVs over buffer 0 to land instead of
// nothing, and wg0 reloads its half of buffer 0 before it waits at barrier B; softmax_a no longer hides under
// QK_b. Faster where most query rows are padding (memory-bound), slower where they are real (docs/KERNEL.md).
constexpr int kSeesawLateMaxRows = 32;

template <MlaDtype DT, int R, int P, int W, bool LATE, bool TMAQ, bool TMAK, bool PAGED>
__device__ __forceinline__ void seesaw_warpgroup(const MlaDecodeParams& p, const SeesawCtx& c) {
  using Tr = DtypeTraits<DT>;
  using T = typename Tr::T;
  constexpr int N = kMlaSeesawNTile;
  constexpr int LB = R / 64, HALF = LB / 2, NV = R / 2;
  constexpr int BLK = N * 128;  // bytes of one 64-column block of a tile (and of the Q tile)
  constexpr int KS_ROPE = P / 16;
  constexpr int OTHER = 1 - W;
  const int wt = threadIdx.x & 127, lane = threadIdx.x & 31, tq = lane & 3;
  const int tiles_total = 2 * c.n_pairs;

  const T* c_kv = static_cast<const T*>(p.c_kv) + static_cast<long long>(c.b) * p.c_kv_sb;
  const T* k_pe = static_cast<const T*>(p.k_pe) + static_cast<long long>(c.b) * p.k_pe_sb;
  // The mbarrier of the j-th block of a part (its rope block is the cross part's block HALF).
  auto mbar = [&](int u, int part, int j) { return c.s_mbar + 8 * (u * (LB + 1) + part * HALF + j); };

  // Copy of latent blocks [W HALF, (W+1) HALF) of `tile` into buffer u (and its rope block when `rope`), by this
  // warpgroup's 128 threads, block by block: all 128 threads copy a block (thread wt: chunk wt % 8 of rows wt / 8
  // + 16 k) and arrive on its own mbarrier before the next, so the blocks land in the order QK reads them and QK
  // starts on the first instead of waiting for the part's last byte. (cp.async.mbarrier.arrive fires once all of
  // the thread's earlier copies landed, so block j's arrival covers blocks < j too.) Both parts this warpgroup
  // ever loads start at block W HALF: its own buffer's self part, and the other buffer's cross part.
  constexpr int BROWS = 128 / 8, BPASS = N / BROWS;                 // latent block: rows a pass, passes
  constexpr int PCH = P / 8, PROWS = 128 / PCH, PPASS = N / PROWS;  // rope
  static_assert(N % BROWS == 0 && 128 % PCH == 0 && N % PROWS == 0 && BROWS % 8 == 0 && PROWS % 8 == 0,
                "copy layout: a thread's rows keep one swizzle phase");
  const int l_row = wt / 8, l_cc = wt % 8;
  const int r_row = wt / PCH, r_cc = wt % PCH;
  const uint32_t l_dst = l_row * 128 + ((l_cc ^ (l_row & 7)) << 4);
  const uint32_t r_dst = LB * BLK + r_row * 128 + ((r_cc ^ (r_row & 7)) << 4);
  auto load_part = [&](int tile, int u, bool rope) {
    const int part = rope ? kCross : kSelf;
    if constexpr (TMAK) {
      // One thread issues the part's boxes, each 64-column block on its own mbarrier (its bytes announced first),
      // block-major as the cp.async path copies them; TMA zero-fills only past T (await_block zeroes [ce, ...)).
      if (wt == 0) {
        const int row = c.cb + tile * N;
        fence_proxy_async();  // the part's earlier generic accesses (P slots, zeroed tails) before the bulk writes
#pragma unroll
        for (int j = 0; j < HALF; ++j) {
          const uint32_t bar = mbar(u, part, j);
          mbar_arrive_expect_tx(bar, BLK);
          tma_load_3d(c.s_buf[u] + (W * HALF + j) * BLK, c.map_kv, (W * HALF + j) * 64, row, c.b, bar);
        }
        if (rope) {
          const uint32_t bar = mbar(u, part, HALF);
          mbar_arrive_expect_tx(bar, BLK);
          tma_load_3d(c.s_buf[u] + LB * BLK, c.map_pe, 0, row, c.b, bar);
        }
      }
    } else if constexpr (PAGED) {  // cp.async as below, each row at its pool row
      const int base = c.cb + tile * N;
      const uint32_t buf = c.s_buf[u];
      const T* src[BPASS];  // this thread's rows, looked up once; then block by block as below
#pragma unroll
      for (int k = 0; k < BPASS; ++k) {
        const int row = base + l_row + k * BROWS;
        src[k] = row < c.ce ? c_kv + pool_row(p, c.b, row) * p.c_kv_st + W * HALF * 64 + l_cc * 8 : nullptr;
      }
#pragma unroll
      for (int j = 0; j < HALF; ++j) {
#pragma unroll
        for (int k = 0; k < BPASS; ++k) {
          cp_async_16(buf + (W * HALF + j) * BLK + l_dst + k * BROWS * 128, src[k] ? src[k] + j * 64 : c_kv,
                      src[k] != nullptr);
        }
        cp_async_mbar_arrive(mbar(u, part, j));
      }
      if (rope) {
#pragma unroll
        for (int k = 0; k < PPASS; ++k) {
          const int row = base + r_row + k * PROWS;
          const bool valid = row < c.ce;
          cp_async_16(buf + r_dst + k * PROWS * 128,
                      valid ? k_pe + pool_row(p, c.b, row) * p.k_pe_st + r_cc * 8 : k_pe, valid);
        }
        cp_async_mbar_arrive(mbar(u, part, HALF));
      }
    } else {
      const int base = c.cb + tile * N;
      const uint32_t buf = c.s_buf[u];
      const T* src = c_kv + static_cast<long long>(base + l_row) * p.c_kv_st + W * HALF * 64 + l_cc * 8;
#pragma unroll
      for (int j = 0; j < HALF; ++j) {
#pragma unroll
        for (int k = 0; k < BPASS; ++k) {
          const bool valid = base + l_row + k * BROWS < c.ce;
          cp_async_16(buf + (W * HALF + j) * BLK + l_dst + k * BROWS * 128,
                      valid ? src + static_cast<long long>(k) * BROWS * p.c_kv_st + j * 64 : c_kv, valid);
        }
        cp_async_mbar_arrive(mbar(u, part, j));
      }
      if (rope) {
        const T* rsrc = k_pe + static_cast<long long>(base + r_row) * p.k_pe_st + r_cc * 8;
#pragma unroll
        for (int k = 0; k < PPASS; ++k) {
          const bool valid = base + r_row + k * PROWS < c.ce;
          cp_async_16(buf + r_dst + k * PROWS * 128, valid ? rsrc + static_cast<long long>(k) * PROWS * p.k_pe_st : k_pe,
                      valid);
        }
        cp_async_mbar_arrive(mbar(u, part, HALF));
      }
    }
  };

  // QK of this warpgroup's tile in buffer W: the self blocks first, then (once landed) the cross blocks
  // and the rope block. Q and the tile share the block layout, so one byte offset serves both operands.
  const uint32_t q_lo = smem_desc_lo(c.s_q, 16), k_lo = smem_desc_lo(c.s_buf[W], 16);
  float s[32];
  // TMAK: TMA fills whole 64-row boxes (zeros only past the capacity T), so the rows of `tile` past the split's
  // end ce hold real (or NaN) cache rows. Softmax masks their scores, but PV would multiply P = 0 by them:
  // zero latent blocks [blk0, blk0 + HALF) of those rows, for the tensor cores, before this warpgroup's QK
  // (the other warpgroup's PV over them follows barrier A or B). Only a split's last tile takes the branch.
  auto zero_tail = [&](int tile, int blk0) {
    const int keep = max(c.ce - (c.cb + tile * N), 0);
    if (keep < N) {
      unsigned char* buf = c.smem + (c.s_buf[W] + blk0 * BLK - c.smem_base);
      const int chunks = (N - keep) * 8;  // 16-byte chunks of one block's dead rows (swizzling stays within a row)
      for (int i = wt; i < HALF * chunks; i += 128) {
        *reinterpret_cast<uint4*>(buf + (i / chunks) * BLK + keep * 128 + (i % chunks) * 16) = make_uint4(0, 0, 0, 0);
      }
      fence_proxy_async();
      named_bar_sync(W == 0 ? kBarWg0 : kBarWg1, 128);
    }
  };
  // Two commit groups: the self part (landed early) and the cross part (landed last), so warpgroup 0 can
  // queue its self part behind the previous pair's last PV before it waits for that PV.
  // Block j of a part of this warpgroup's tile landed and is visible to the tensor cores (each block has its
  // mbarrier). The explicit wgmma fence follows the wait loop's branches (ptxas would inject one, C7519).
  auto await_block = [&](int tile, int part, int j, uint32_t parity) {
    if constexpr (TMAK) {
      // Block by block as cp.async, except a split's last tile: its latent blocks all land, then lose their rows
      // past ce (only there; the later waits on the same phase return at once).
      if (j == 0 && c.ce - (c.cb + tile * N) < N) {
#pragma unroll
        for (int jj = 0; jj < HALF; ++jj) mbar_wait(mbar(W, part, jj), parity);
        zero_tail(tile, (part == kSelf ? W : OTHER) * HALF);
      }
      mbar_wait(mbar(W, part, j), parity);
    } else {
      mbar_wait(mbar(W, part, j), parity);
    }
    fence_proxy_async();
    wgmma_fence();
  };
  auto qk_self = [&](int tile, uint32_t parity) {
    fence_operand(s);
#pragma unroll
    for (int j = 0; j < HALF * 4; ++j) {
      if (j % 4 == 0) await_block(tile, kSelf, j / 4, parity);
      const uint32_t off = ((W * HALF + j / 4) * BLK + (j % 4) * 32) >> 4;
      wgmma_ss_m64n64<DT>(s, smem_desc_kmajor(q_lo + off), smem_desc_kmajor(k_lo + off), j > 0 ? 1 : 0);
    }
    wgmma_commit();
  };
  auto qk_cross = [&](int tile, uint32_t parity) {
#pragma unroll
    for (int j = 0; j < HALF * 4; ++j) {
      if (j % 4 == 0) await_block(tile, kCross, j / 4, parity);
      const uint32_t off = ((OTHER * HALF + j / 4) * BLK + (j % 4) * 32) >> 4;
      wgmma_ss_m64n64<DT>(s, smem_desc_kmajor(q_lo + off), smem_desc_kmajor(k_lo + off), 1);
    }
    await_block(tile, kCross, HALF, parity);
#pragma unroll
    for (int j = 0; j < KS_ROPE; ++j) {
      const uint32_t off = (LB * BLK + j * 32) >> 4;
      wgmma_ss_m64n64<DT>(s, smem_desc_kmajor(q_lo + off), smem_desc_kmajor(k_lo + off), 1);
    }
    wgmma_commit();
  };

  float o[NV / 2];
#pragma unroll
  for (int e = 0; e < NV / 2; ++e) o[e] = 0.f;
  // PV: V rows 16 ks.. of buffer u, output columns of blocks [W HALF, (W+1) HALF); P from registers.
  auto pv = [&](const uint32_t (&pa)[4][4], int u) {
    const uint32_t vb = c.s_buf[u] + W * HALF * BLK;
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) wgmma_pv<DT, NV>(o, pa[ks], smem_desc(vb + ks * 16 * 128, BLK, 1024));
  };

  // Online softmax of `tile` in place (s becomes P in fp32), against the running max `base` of the
  // fragments' two rows; returns the new max (lazy: it moves only past base + 8) and adds the row sums.
  auto softmax = [&](int tile, float base0, float base1, float& mn0, float& mn1, float& sum0, float& sum1) {
    const int t0 = c.cb + tile * N + 2 * tq;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      // Fragment q: row r0 columns 8q + 2tq + {0, 1}, row r1 the same columns.
      const int t = t0 + 8 * q;
      s[4 * q] = t < c.vis0 ? s[4 * q] * c.scale_log2 : -INFINITY;
      s[4 * q + 1] = t + 1 < c.vis0 ? s[4 * q + 1] * c.scale_log2 : -INFINITY;
      s[4 * q + 2] = t < c.vis1 ? s[4 * q + 2] * c.scale_log2 : -INFINITY;
      s[4 * q + 3] = t + 1 < c.vis1 ? s[4 * q + 3] * c.scale_log2 : -INFINITY;
    }
    float mx0 = fmaxf(s[0], s[1]), mx1 = fmaxf(s[2], s[3]);
#pragma unroll
    for (int q = 1; q < 8; ++q) {
      mx0 = fmaxf(mx0, fmaxf(s[4 * q], s[4 * q + 1]));
      mx1 = fmaxf(mx1, fmaxf(s[4 * q + 2], s[4 * q + 3]));
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    mn0 = mx0 > base0 + 8.f ? mx0 : base0;
    mn1 = mx1 > base1 + 8.f ? mx1 : base1;
    const float mu0 = mn0 == -INFINITY ? 0.f : mn0, mu1 = mn1 == -INFINITY ? 0.f : mn1;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      s[4 * q] = exp2f(s[4 * q] - mu0);
      s[4 * q + 1] = exp2f(s[4 * q + 1] - mu0);
      s[4 * q + 2] = exp2f(s[4 * q + 2] - mu1);
      s[4 * q + 3] = exp2f(s[4 * q + 3] - mu1);
      sum0 += s[4 * q] + s[4 * q + 1];
      sum1 += s[4 * q + 2] + s[4 * q + 3];
    }
  };
  // Factor that takes values relative to max `from` to max `to` (to >= from; 0 from -inf).
  auto rescale_factor = [](float from, float to) { return to == from ? 1.f : exp2f(from - (to == -INFINITY ? 0.f : to)); };
  // P into the A fragments of the four PV k-steps (keys 16 ks..): {row r0, keys 2tq..}, {r1, 2tq..},
  // {r0, 8+2tq..}, {r1, 8+2tq..}.
  auto pack_p = [&](uint32_t (&pa)[4][4]) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        auto v = Tr::pack(s[8 * ks + 2 * j], s[8 * ks + 2 * j + 1]);
        pa[ks][j] = *reinterpret_cast<uint32_t*>(&v);
      }
    }
  };
  auto rescale_o = [&](float a0, float a1) {
    if (__any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) {
#pragma unroll
      for (int j = 0; j < NV / 8; ++j) {
        o[4 * j] *= a0;
        o[4 * j + 1] *= a0;
        o[4 * j + 2] *= a1;
        o[4 * j + 3] *= a1;
      }
    }
  };
  // Slot q of thread t in the rope block of buffer u at (q 128 + t) 16 bytes: a warp's accesses are
  // consecutive 16-byte words, no bank conflicts.
  auto p_slots = [&](int u) { return reinterpret_cast<uint4*>(c.smem + (c.s_buf[u] + LB * BLK - c.smem_base)) + wt; };
  auto send_p = [&](const uint32_t (&pa)[4][4], int u) {
    uint4* slot = p_slots(u);
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) slot[ks * 128] = make_uint4(pa[ks][0], pa[ks][1], pa[ks][2], pa[ks][3]);
  };
  auto receive_p = [&](uint32_t (&pb)[4][4], int u) {
    const uint4* slot = p_slots(u);
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      const uint4 v = slot[ks * 128];
      pb[ks][0] = v.x;
      pb[ks][1] = v.y;
      pb[ks][2] = v.z;
      pb[ks][3] = v.w;
    }
  };

  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // running max (log2) and this thread's sums
  uint32_t pa[4][4], pb[4][4];
  constexpr int kBarMine = W == 0 ? kBarWg0 : kBarWg1;

  // Prologue loads: the self part of this warpgroup's first tile, the cross part of the other one's, in
  // flight with the Q tile (its cp.async group was committed by the kernel; these are in no group).
  load_part(W, W, false);
  load_part(OTHER, OTHER, true);
  if constexpr (TMAQ) {
    mbar_wait(c.s_qbar, 0);
  } else {
    cp_async_wait<0>();
  }
  fence_proxy_async();
  named_bar_sync(kBarQ, 256);  // every thread's part of Q landed and is visible to the tensor cores
  if (kTimelinePhases && threadIdx.x == 0) timeline_stamp(p, kTlDecode, kTlQ);

  for (int k = 0; k < c.n_pairs; ++k) {
    const int tile = 2 * k + W;
    const uint32_t parity = static_cast<uint32_t>(k & 1);
    float mn0, mn1, sum0 = 0.f, sum1 = 0.f;
    if constexpr (W == 0) {
      qk_self(tile, parity);
      if (k > 0) {
        // The previous pair's PV over buffer 1 (queued ahead of this QK) is done: reload its cross part.
        wgmma_wait<1>();
        fence_operand(o);
        fence_operand(pb);
        named_bar_sync(kBarMine, 128);  // buffer 1's V half of this warpgroup and wg1's P slots are read
        if (tile + 1 < tiles_total) load_part(tile + 1, 1, true);
      }
      qk_cross(tile, parity);
      wgmma_wait<0>();
      fence_operand(s);
      if (kTimelinePhases && k == 0 && wt == 0) timeline_stamp(p, kTlDecode, kTlFirst);
      softmax(tile, m0, m1, mn0, mn1, sum0, sum1);
      pack_p(pa);
      send_p(pa, 0);
      c.slot_ma[wt] = make_float2(mn0, mn1);
      named_bar_arrive(kBarA, 256);
      const float a0 = rescale_factor(m0, mn0), a1 = rescale_factor(m1, mn1);
      rescale_o(a0, a1);
      l0 = l0 * a0 + sum0;
      l1 = l1 * a1 + sum1;
      m0 = mn0;
      m1 = mn1;
      fence_operand(o);
      fence_operand(pa);
      wgmma_fence();
      pv(pa, 0);
      wgmma_commit();
      if constexpr (LATE) {
        // wg1's QK_b runs after both PVs over buffer 0: reload this half of buffer 0 before waiting for it.
        wgmma_wait<0>();
        fence_operand(o);
        fence_operand(pa);
        named_bar_sync(kBarMine, 128);
        if (tile + 2 < tiles_total) load_part(tile + 2, 0, false);
      }
      // wg1's P_b and m_b (its softmax ran under the PVs over buffer 0).
      named_bar_sync(kBarB, 256);
      const float2 mb = c.slot_mb[wt];
      receive_p(pb, 1);
      if constexpr (!LATE) {
        wgmma_wait<0>();
        fence_operand(o);
        fence_operand(pa);
        named_bar_sync(kBarMine, 128);  // all of this warpgroup is past its PV over buffer 0
        if (tile + 2 < tiles_total) load_part(tile + 2, 0, false);
      }
      const float b0 = rescale_factor(m0, mb.x), b1 = rescale_factor(m1, mb.y);
      rescale_o(b0, b1);
      l0 *= b0;
      l1 *= b1;
      m0 = mb.x;
      m1 = mb.y;
      fence_operand(o);
      fence_operand(pb);
      wgmma_fence();
      pv(pb, 1);
      wgmma_commit();  // waited for after the next pair's QK is queued (or after the loop)
    } else {
      if constexpr (!LATE) {
        qk_self(tile, parity);
        qk_cross(tile, parity);
      }
      // wg0's m_a and P_a. O_R moves to m_a at once and takes P_a V_a,R while this QK finishes and the
      // softmax runs, so buffer 0 is free (and reloaded) early in the pair.
      named_bar_sync(kBarA, 256);
      const float2 ma = c.slot_ma[wt];
      receive_p(pb, 0);
      const float a0 = rescale_factor(m0, ma.x), a1 = rescale_factor(m1, ma.y);
      rescale_o(a0, a1);
      fence_operand(o);
      fence_operand(pb);
      wgmma_fence();
      pv(pb, 0);
      wgmma_commit();
      if constexpr (LATE) {
        // QK_b after P_a V_a,R: the reload of this tile (issued at the end of the last pair) has the time of
        // QK_a, softmax_a and both PVs over buffer 0 to land, instead of none.
        qk_self(tile, parity);
        qk_cross(tile, parity);
        wgmma_wait<2>();  // the PV over buffer 0 is done, this QK may still run
        fence_operand(o);
        fence_operand(pb);
        named_bar_sync(kBarMine, 128);
        if (tile + 1 < tiles_total) load_part(tile + 1, 0, true);
        wgmma_wait<0>();
      } else {
        wgmma_wait<1>();  // this QK is done, the PV over buffer 0 may still run
      }
      fence_operand(s);
      softmax(tile, ma.x, ma.y, mn0, mn1, sum0, sum1);
      pack_p(pa);
      send_p(pa, 1);
      c.slot_mb[wt] = make_float2(mn0, mn1);
      named_bar_arrive(kBarB, 256);
      const float b0 = rescale_factor(ma.x, mn0), b1 = rescale_factor(ma.y, mn1);
      l0 = l0 * (a0 * b0) + sum0;
      l1 = l1 * (a1 * b1) + sum1;
      m0 = mn0;
      m1 = mn1;
      if constexpr (!LATE) {
        wgmma_wait<0>();
        fence_operand(o);
        fence_operand(pb);
        named_bar_sync(kBarMine, 128);  // buffer 0's V half of this warpgroup and wg0's P slots are read
        if (tile + 1 < tiles_total) load_part(tile + 1, 0, true);
      }
      rescale_o(b0, b1);
      fence_operand(o);
      fence_operand(pa);
      wgmma_fence();
      pv(pa, 1);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operand(o);
      fence_operand(pa);
      named_bar_sync(kBarMine, 128);
      if (tile + 2 < tiles_total) load_part(tile + 2, 1, false);
    }
  }
  if constexpr (W == 0) {
    wgmma_wait<0>();  // the last PV over buffer 1
    fence_operand(o);
  }
  if (kTimelinePhases && wt == 0) timeline_stamp(p, kTlDecode, W == 0 ? kTlLoopEnd : kTlLoopEnd1);

  // ---- epilogue: the row sums of both warpgroups (same fragment positions in slot t), then each
  // warpgroup normalizes and writes its R/2 columns.
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  c.slot_l[W * 128 + wt] = make_float2(l0, l1);
  named_bar_sync(kBarEnd, 256);
  const float2 lo = c.slot_l[OTHER * 128 + wt];
  l0 += lo.x;
  l1 += lo.y;
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  const int nsplit = c.nsplit, MT = c.MT;
  if (W == 0 && tq == 0) {
    const float lse0 = l0 > 0.f ? (m0 + __log2f(l0)) * kLn2 : -INFINITY;
    const float lse1 = l1 > 0.f ? (m1 + __log2f(l1)) * kLn2 : -INFINITY;
    float* dst = nsplit == 1 ? p.lse + static_cast<size_t>(c.b) * MT
                             : p.lse_partial + (static_cast<size_t>(c.b) * nsplit + c.split) * MT;
    if (c.g0 < MT) dst[c.g0] = lse0;
    if (c.g1 < MT) dst[c.g1] = lse1;
  }
  // The normalized rows go through shared memory (the Q tile and buffer 0, free once both loops are done),
  // so global stores are whole 16-byte chunks of consecutive columns: the fragments hold 4- or 8-byte pieces
  // of 8 rows. Rows are padded by 16 bytes, so the fragment writes hit 32 banks.
  const int r0 = (wt >> 5) * 16 + (lane >> 2), col = W * NV + 2 * tq;
  // Rows of the input dtype, padded by 8 elements.
  auto store_rows = [&](T* out) {
    constexpr int ES = sizeof(T), ROWB = (R + 8) * ES, CPR = R * ES / 16;  // CPR: 16-byte chunks a row
    unsigned char* stage = c.smem + (c.s_q - c.smem_base);
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      const float inv = hi ? inv1 : inv0;
      unsigned char* row = stage + (r0 + 8 * hi) * ROWB + col * ES;
#pragma unroll
      for (int j = 0; j < NV / 8; ++j) {
        *reinterpret_cast<typename DtypeTraits<DT>::T2*>(row + j * 8 * ES) =
            pack_out<DT>(o[4 * j + 2 * hi] * inv, o[4 * j + 2 * hi + 1] * inv);
      }
    }
    named_bar_sync(kBarOut, 256);
    for (int i = threadIdx.x; i < kMlaSeesawMTile * CPR; i += 256) {
      const int r = i / CPR, cc = i % CPR;
      if (c.row0 + r < MT) {
        *reinterpret_cast<uint4*>(reinterpret_cast<unsigned char*>(out + static_cast<size_t>(r) * R) + cc * 16) =
            *reinterpret_cast<const uint4*>(stage + r * ROWB + cc * 16);
      }
    }
    if (kTimelinePhases && threadIdx.x == 0) timeline_stamp(p, kTlDecode, kTlExit);
  };
  if (nsplit == 1) {
    store_rows(static_cast<T*>(p.out_latent) + (static_cast<size_t>(c.b) * MT + c.row0) * R);
  } else {
    store_rows(static_cast<T*>(p.o_partial) + ((static_cast<size_t>(c.b) * nsplit + c.split) * MT + c.row0) * R);
  }
}


// One CTA per 64 query rows of a (sequence, split). TMAQ: the query tile by TMA from one thread (seesaw_tma_q_serves)
// instead of 4608 16-byte cp.async from all 256, whose issue held every CTA's prologue for microseconds. TMAK
// (R = 512): the cache tiles by TMA, one thread a part, so the loading warpgroup no longer issues ~36 cp.async and
// their addresses a thread a pair. (docs/KERNEL.md has the measurements.)
template <MlaDtype DT, int R, int P, bool LATE, bool TMAQ, bool TMAK, bool PAGED = false>
__global__ void __launch_bounds__(256, 1) seesaw_kernel(const MlaDecodeParams p,
                                                        const __grid_constant__ KernelMaps<TMAQ, TMAK> maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename DtypeTraits<DT>::T;
  constexpr int M = kMlaSeesawMTile, N = kMlaSeesawNTile, D = R + P;
  constexpr int NB = wgmma_col_blocks(R, P);
  constexpr int BLK = N * 128, TILE = NB * BLK, CHUNKS = D / 8;
  static_assert(M == 64 && N == 64 && (R == 512 || R == 256) && P % 16 == 0 && P <= 64 && NB == R / 64 + 1,
                "layout assumes 64-row tiles, R in {256, 512}, one rope block");
  static_assert(seesaw_smem_bytes(R, P) == 1024 + 3 * TILE + 4 * 1024 + 8 * (2 * NB + 1),
                "smem size: the block mbarriers and the query's");
  static_assert(M * (R + 8) * 2 <= 3 * TILE, "the output rows are staged in the Q tile and the buffers");
  static_assert(!TMAK || (R == 512 && P == 64), "cache tiles by TMA: 128-byte rows in every block (the rope's too)");
  static_assert(!TMAQ || TMAK, "the query tile by TMA comes with the cache tiles by TMA");

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw_addr = smem_addr(smem_raw);
  SeesawCtx c;
  c.smem_base = raw_addr;
  c.smem = smem_raw;
  c.s_q = (raw_addr + 1023) & ~1023u;
  c.s_buf[0] = c.s_q + TILE;
  c.s_buf[1] = c.s_q + 2 * TILE;
  const uint32_t s_slots = c.s_q + 3 * TILE;
  c.slot_ma = reinterpret_cast<float2*>(smem_raw + (s_slots - raw_addr));
  c.slot_mb = c.slot_ma + 128;
  c.slot_l = c.slot_ma + 256;
  c.s_mbar = s_slots + 4 * 1024;

  const int tid = threadIdx.x, wt = tid & 127, lane = tid & 31;
  // Warp-uniform in the compiler's eyes (a shuffle from lane 0): wgmma in a branch it thinks divergent
  // makes ptxas serialize every wgmma of the kernel (C7520).
  const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
  const int gq = lane >> 2;
  const int r0 = (wt >> 5) * 16 + gq, r1 = r0 + 8;  // CTA-local query rows of this thread's fragments
  c.b = blockIdx.z;
  c.split = blockIdx.y;
  c.MT = p.S * p.H;
  c.row0 = blockIdx.x * M;
  c.nsplit = p.num_splits;
  const int b = c.b, MT = c.MT, row0 = c.row0, nsplit = c.nsplit;

  const TimelineStamp t_entry = timeline_now();
  pdl_launch_dependents();
  pdl_wait();
  if (tid == 0) timeline_entered(p, kTlDecode, t_entry);
  // The lengths first, then the Q tile (rows past S*H zero-filled), swizzled, by all 256 threads, starting at
  // an offset of its own in each split: the same order and reasons as mma_kernel.
  const int start_raw = p.kv_start[b], end_raw = p.kv_end[b];
  if constexpr (TMAQ) {
    // H is a multiple of 64 (seesaw_tma_q_serves): the tile is 64 heads of one token, one box a 64-column
    // block, in the same swizzled layout as the cp.async path.
    c.s_qbar = c.s_mbar + 2 * NB * 8;  // after the block mbarriers
    if (tid == 0) {
      mbar_init(c.s_qbar, 1);
      fence_mbarrier_init();  // visible to the copy engine before its bytes arrive on it
      mbar_arrive_expect_tx(c.s_qbar, NB * BLK);
#pragma unroll
      for (int blk = 0; blk < NB; ++blk) {
        tma_load_4d(c.s_q + blk * BLK, blk < R / 64 ? &maps.q_latent : &maps.q_pe, blk < R / 64 ? blk * 64 : 0,
                    row0 % p.H, row0 / p.H, b, c.s_qbar);
      }
    }
  } else {
    const int q_rot = (c.split * 256) % (M * CHUNKS);
    for (int i0 = tid; i0 < M * CHUNKS; i0 += 256) {
      const int i = i0 + q_rot < M * CHUNKS ? i0 + q_rot : i0 + q_rot - M * CHUNKS;
      const int r = i / CHUNKS, cc = i % CHUNKS;
      cp_async_16(c.s_q + (cc >> 3) * BLK + r * 128 + (((cc & 7) ^ (r & 7)) << 4),
                  query_chunk_src<T, R>(p, b, row0 + r, cc), row0 + r < MT);
    }
    cp_async_commit();  // waited for in seesaw_warpgroup, after the first tile loads are issued
  }
  // This CTA's rows: the visible range cut into num_splits chunks of whole pairs of tiles.
  const int start = max(start_raw, 0);
  const int end = min(end_raw, p.T);
  const int len = max(end - start, 0);
  const int per = ceil_div(ceil_div(len, nsplit), 2 * N) * 2 * N;
  const long long cb_l = static_cast<long long>(start) + static_cast<long long>(c.split) * per;
  c.cb = static_cast<int>(cb_l < end ? cb_l : end);
  c.ce = static_cast<int>(min(cb_l + per, static_cast<long long>(end)));
  const int n_tiles = c.ce > c.cb ? ceil_div(c.ce - c.cb, N) : 0;
  c.n_pairs = ceil_div(n_tiles, 2);
  if (tid == 0) timeline_meta(p, kTlDecode, n_tiles);

  if (n_tiles == 0) {
    if constexpr (TMAQ) {
      if (tid == 0) mbar_wait(c.s_qbar, 0);  // the Q copy lands before the CTA exits (tid 0 initialized the mbarrier)
    } else {
      cp_async_wait<0>();  // the Q copy lands before the CTA exits
    }
    write_empty_split<T, R, M>(p, tid, b, c.split, nsplit, MT, row0);
    return;
  }
  if (tid == 0) timeline_stamp(p, kTlDecode, kTlLengths);

  // Rows of this thread's fragments may see cache rows [cb, vis): causal among the S new tokens.
  c.g0 = row0 + r0;
  c.g1 = row0 + r1;
  c.vis0 = c.g0 < MT ? min(end - (p.S - 1 - c.g0 / p.H), c.ce) : c.cb;
  c.vis1 = c.g1 < MT ? min(end - (p.S - 1 - c.g1 / p.H), c.ce) : c.cb;
  c.scale_log2 = p.sm_scale * kLog2e;

  if constexpr (TMAK) {
    c.map_kv = &maps.c_kv;
    c.map_pe = &maps.k_pe;
  }
  if (tid == 0) {
    // cp.async: one arrival a thread of the loader; TMA: its issuing thread's expect_tx.
#pragma unroll
    for (int i = 0; i < 2 * NB; ++i) mbar_init(c.s_mbar + 8 * i, TMAK ? 1 : 128);
    if constexpr (TMAK) fence_mbarrier_init();  // visible to the copy engine
  }
  __syncthreads();  // the mbarriers are initialized before any copy arrives on them

  if (wg == 0) {
    seesaw_warpgroup<DT, R, P, 0, LATE, TMAQ, TMAK, PAGED>(p, c);
  } else {
    seesaw_warpgroup<DT, R, P, 1, LATE, TMAQ, TMAK, PAGED>(p, c);
  }
#else
  // Built without sm_90a: never dispatched (sm90a_kernels_built); fail loudly if it is.
  __trap();
#endif
}

}  // namespace mla

namespace mla {

template <MlaDtype DT, int R, int P, bool LATE, bool TMAQ, bool TMAK, typename Maps>
cudaError_t launch_seesaw_variant(const MlaDecodeParams& params, cudaStream_t stream, const Maps& maps) {
  static bool smem_set[64] = {}, paged_smem_set[64] = {};
  if constexpr (!TMAQ && !TMAK) {
    if (params.row_index != nullptr) {
      return launch_main_kernel(seesaw_kernel<DT, R, P, LATE, false, false, true>, kMlaSeesawMTile,
                                seesaw_smem_bytes(R, P), paged_smem_set, params, stream, maps);
    }
  }
  return launch_main_kernel(seesaw_kernel<DT, R, P, LATE, TMAQ, TMAK>, kMlaSeesawMTile, seesaw_smem_bytes(R, P),
                            smem_set, params, stream, maps);
}

// The late-QK_b order where the CTA's 64 query rows are mostly padding (memory-bound), the seesaw where they are
// real (compute-bound): see kSeesawLateMaxRows. (A query by TMA has H >= 64 rows: never late.)
template <MlaDtype DT, int R, int P, bool TMAQ, bool TMAK, typename Maps>
cudaError_t launch_seesaw_order(const MlaDecodeParams& params, cudaStream_t stream, const Maps& maps) {
  if constexpr (TMAQ) {
    return launch_seesaw_variant<DT, R, P, false, true, TMAK>(params, stream, maps);
  } else {
    return params.S * params.H <= kSeesawLateMaxRows ? launch_seesaw_variant<DT, R, P, true, false, TMAK>(params, stream, maps)
                                                    : launch_seesaw_variant<DT, R, P, false, false, TMAK>(params, stream, maps);
  }
}

}  // namespace mla

// The cache tiles by TMA where params.tma and R = 512 and the maps encode, with the query tile too where
// seesaw_tma_q_serves; else every tile by cp.async.
template <MlaDtype DT, int R, int P>
cudaError_t launch_seesaw(const MlaDecodeParams& params, cudaStream_t stream, Launched* ran) {
  *ran = Launched{Kernel::kSeesaw, false, false};
  cudaError_t err;
  bool done = false;
  if constexpr (R == 512 && P == 64) {
    const bool query = seesaw_tma_q_serves(R, params.H);
    mla::TileMaps maps;
    if (params.tma && mla::tile_maps<DT, kMlaSeesawMTile, kMlaSeesawNTile>(params, R, P, query, &maps)) {
      *ran = Launched{Kernel::kSeesaw, query, true};
      err = query ? mla::launch_seesaw_order<DT, R, P, true, true>(params, stream, maps)
                  : mla::launch_seesaw_order<DT, R, P, false, true>(params, stream, maps);
      done = true;
    }
  }
  if (!done) err = mla::launch_seesaw_order<DT, R, P, false, false>(params, stream, mla::NoMaps{});
  if (err != cudaSuccess || params.num_splits == 1) return err;
  return mla::launch_combine<DT, R>(params, stream);
}
