// sm_90a path of the absorbed MLA decode (kernel v6): wgmma with 64 query rows a CTA.
// Same contract and split-KV convention as mla_decode_kernel (mla_decode.cuh), whose LSE combine it
// reuses; chosen by binding.cpp on compute capability 9.0 when S*H >= 64 (and, by default, from 16K
// cached rows a call).
//
// Grid: x = 64-row tile of the S*H query rows (fastest: H = 128 has 2, adjacent, so the second read
// of each cache tile is an L2 hit), y = KV split, z = sequence. Block: 256 threads = 2 warpgroups.
// Per 32-row cache tile i (the CTA's rows [cb, ce) cut as in mla_decode_kernel):
//   QK: warpgroup w computes partial scores of all 64 query rows against the 32 cache rows over half of
//       the 576 (288) columns, the 16-column k-steps 2j + w: wgmma m64n32k16, A = Q and B = K both from
//       shared memory. Thread t of each warpgroup holds the same fragment positions.
//   softmax: warpgroup 0 sends its partial scores to warpgroup 1 through thread t's exchange slot;
//       warpgroup 1 adds them and runs the online softmax (log2 domain, lazy rescale as in v3), keeps P
//       in registers in the wgmma A-fragment layout (the accumulator layout of QK is that layout) and
//       sends the packed P and the row rescale factors back through the same slot.
//   PV: warpgroup w owns output columns [w R/2, (w+1) R/2) for all 64 rows: wgmma m64n(R/2)k16,
//       A = P from registers, B = V = the tile's latent columns, MN-major (transposed) from shared memory.
// Pipeline: at [X] tile i+1 has landed (tile i+2 may be in flight) and warpgroup 0 takes P(i) from its
// slot; QK(i+1) and PV(i) are issued back to back, then the copy of tile i+3 (into the stage of tile
// i-1), and softmax(i+1) runs on warpgroup 1's CUDA cores while PV(i) runs on the tensor cores.
// Barriers a tile: [X] and the partial-score hand-over.
// Shared memory (1024-aligned, 128-byte swizzle: 16-byte chunk c of row r sits at chunk c ^ (r % 8)
// of its 128-byte row, the layout wgmma's swizzle mode reads): Q [NB blocks][64 rows][64 cols],
// 4 cache tiles [NB][32 rows][64 cols] filled by cp.async (zero-fill outside [cb, ce), so NaN rows
// never reach a product), the exchange slots [4][128] float4 (R = 512: 230,400 of 232,448 bytes).
#pragma once

#include "mla_decode.cuh"
#include "mla_wgmma_ops.cuh"

namespace mla {

__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// cp.async writes (generic proxy) must be ordered before wgmma's reads (async proxy).
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Pins registers an in-flight wgmma reads or writes, so the compiler neither moves their uses
// across the wait nor reuses them before it.
template <int N>
__device__ __forceinline__ void fence_operand(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_operand(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle. K-major: sbo = byte stride of 8-row groups,
// lbo unused (16). MN-major: lbo = byte stride of 64-element column blocks, sbo = 8-row K groups.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32) | (1ull << 62);
}
// The same split in words: low = address and LBO, high = SBO and the swizzle mode. Adding a byte offset
// / 16 to the low word moves the start address (it stays below 2^18, so nothing carries into LBO).
__device__ __forceinline__ uint32_t smem_desc_lo(uint32_t addr, uint32_t lbo) {
  return ((addr & 0x3FFFF) >> 4) | ((lbo >> 4) << 16);
}
__device__ __forceinline__ uint64_t smem_desc_kmajor(uint32_t lo) {  // SBO 1024 bytes
  return (static_cast<uint64_t>((1024u >> 4) | (1u << 30)) << 32) | lo;
}

template <MlaDtype DT, int NV>
__device__ __forceinline__ void wgmma_pv(float (&o)[NV / 2], const uint32_t (&a)[4], uint64_t desc_b) {
  if constexpr (NV == 256) {
    wgmma_rs_m64n256<DT>(o, a, desc_b, 1);
  } else {
    wgmma_rs_m64n128<DT>(o, a, desc_b, 1);
  }
}

// DIAG (timing diagnostics only, built with MLA_PATCH_DIAG; results are wrong): bit 0 drops the cache
// loads of the main loop, bit 1 the partial-score exchange and its barrier, bit 2 the loop's wgmmas.
// Timing what is left shows what each stage costs (docs/KERNEL.md).
template <MlaDtype DT, int R, int P, int DIAG = 0>
__global__ void __launch_bounds__(256, 1) mla_decode_wgmma_kernel(const MlaDecodeParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Tr = DtypeTraits<DT>;
  using T = typename Tr::T;
  using T2 = typename Tr::T2;
  constexpr int M = kMlaWgmmaMTile, N = kMlaNTile, D = R + P;
  constexpr int NB = mla_wgmma_col_blocks(R, P);  // 64-column swizzle blocks of a row
  constexpr int KSTEPS = D / 16, KS_WG = KSTEPS / 2;  // QK k-steps, per warpgroup
  constexpr int NV = R / 2, NVB = NV / 64;            // PV output columns (and blocks) per warpgroup
  constexpr int Q_BLK = M * 128, KV_BLK = N * 128;    // bytes of one 64-column block
  constexpr int Q_BYTES = NB * Q_BLK, KV_BYTES = NB * KV_BLK;
  constexpr int STAGES = kMlaWgmmaStages;
  constexpr int CHUNKS = D / 8;
  static_assert(N == 32 && M == 64 && KSTEPS % 2 == 0 && (NV == 128 || NV == 256) && STAGES >= 3,
                "layout assumes 64 query rows, 32-row tiles, R in {256, 512}");
  static_assert(mla_wgmma_smem_bytes(R, P) == 1024 + Q_BYTES + STAGES * KV_BYTES + 128 * 64, "smem size");

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw_addr = smem_addr(smem_raw);
  const uint32_t s_q = (raw_addr + 1023) & ~1023u;
  const uint32_t s_kv = s_q + Q_BYTES;
  float4* xchg = reinterpret_cast<float4*>(smem_raw + (s_q - raw_addr) + Q_BYTES + STAGES * KV_BYTES);  // [128][4]

  const int tid = threadIdx.x, wg = tid >> 7, wtid = tid & 127, lane = tid & 31;
  const int gq = lane >> 2, tq = lane & 3;
  const int r0 = (wtid >> 5) * 16 + gq, r1 = r0 + 8;  // CTA-local query rows of this thread's fragments
  const int b = blockIdx.z, split = blockIdx.y;
  const int MT = p.S * p.H;
  const int row0 = blockIdx.x * M;
  const int nsplit = p.num_splits;

  const int start = max(p.kv_start[b], 0);
  const int end = min(p.kv_end[b], p.T);
  const int len = max(end - start, 0);
  const int per = ceil_div(ceil_div(len, nsplit), N) * N;
  const long long cb_l = static_cast<long long>(start) + static_cast<long long>(split) * per;
  const int cb = static_cast<int>(cb_l < end ? cb_l : end);
  const int ce = static_cast<int>(min(cb_l + per, static_cast<long long>(end)));
  const int n_tiles = ce > cb ? ceil_div(ce - cb, N) : 0;

  if (n_tiles == 0) {
    if (nsplit == 1) {
      T* out = static_cast<T*>(p.out_latent);
      for (int c = tid; c < M * (R / 8); c += 256) {
        const int r = c / (R / 8), cc = c % (R / 8);
        if (row0 + r < MT) {
          *reinterpret_cast<uint4*>(out + (static_cast<size_t>(b) * MT + row0 + r) * R + cc * 8) =
              make_uint4(0, 0, 0, 0);
        }
      }
      if (tid < M && row0 + tid < MT) p.lse[static_cast<size_t>(b) * MT + row0 + tid] = -INFINITY;
    } else if (tid < M && row0 + tid < MT) {
      p.lse_partial[(static_cast<size_t>(b) * nsplit + split) * MT + row0 + tid] = -INFINITY;
    }
    return;
  }

  const T* q_lat = static_cast<const T*>(p.q_latent);
  const T* q_pe = static_cast<const T*>(p.q_pe);
  const T* c_kv = static_cast<const T*>(p.c_kv) + static_cast<long long>(b) * p.c_kv_sb;
  const T* k_pe = static_cast<const T*>(p.k_pe) + static_cast<long long>(b) * p.k_pe_sb;

  // Q tile (rows past S*H zero-filled), swizzled.
  for (int c = tid; c < M * CHUNKS; c += 256) {
    const int r = c / CHUNKS, cc = c % CHUNKS;
    const int g = row0 + r;
    const bool valid = g < MT;
    const int s = valid ? g / p.H : 0, h = valid ? g % p.H : 0;
    const T* src = cc < R / 8 ? q_lat + b * p.q_latent_sb + s * p.q_latent_ss + h * p.q_latent_sh + cc * 8
                              : q_pe + b * p.q_pe_sb + s * p.q_pe_ss + h * p.q_pe_sh + (cc - R / 8) * 8;
    cp_async_16(s_q + (cc >> 3) * Q_BLK + r * 128 + (((cc & 7) ^ (r & 7)) << 4), valid ? src : q_lat, valid);
  }
  cp_async_commit();

  // Cache tile copy: a fixed chunk column per thread. Latent: chunk tid % LCH, rows tid / LCH + k LROWS;
  // rope: chunk R/8 + tid % PCH, row tid / PCH (threads < 32 PCH).
  constexpr int LCH = R / 8, PCH = P / 8;
  constexpr int LROWS = 256 / LCH, LPASS = N / LROWS;
  static_assert(256 % LCH == 0 && N % LROWS == 0 && N * PCH <= 256, "copy layout");
  const int l_row = tid / LCH, l_c = tid % LCH;
  const int r_row = tid / PCH, r_c = LCH + tid % PCH;
  const bool r_active = tid < N * PCH;
  const T* lat_src = c_kv + static_cast<long long>(cb + l_row) * p.c_kv_st + l_c * 8;
  const T* rope_src = k_pe + static_cast<long long>(cb + r_row) * p.k_pe_st + (r_c - LCH) * 8;
  const long long lat_pass = static_cast<long long>(LROWS) * p.c_kv_st;
  const uint32_t rope_dst = (r_c >> 3) * KV_BLK + r_row * 128 + (((r_c & 7) ^ (r_row & 7)) << 4);
  auto load_tile = [&](int tile, int stage) {
    const int base = cb + tile * N;
    const uint32_t dst = s_kv + stage * KV_BYTES;
    const T* src = lat_src + static_cast<long long>(tile) * N * p.c_kv_st;
#pragma unroll
    for (int k = 0; k < LPASS; ++k) {
      const int r = l_row + k * LROWS;
      const bool valid = base + r < ce;
      cp_async_16(dst + (l_c >> 3) * KV_BLK + r * 128 + (((l_c & 7) ^ (r & 7)) << 4),
                  valid ? src + k * lat_pass : c_kv, valid);
    }
    if (r_active) {
      const bool valid = base + r_row < ce;
      cp_async_16(dst + rope_dst, valid ? rope_src + static_cast<long long>(tile) * N * p.k_pe_st : k_pe, valid);
    }
  };

#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < n_tiles) load_tile(st, st);
    cp_async_commit();
  }

  // QK k-steps of this warpgroup: kk = 2j + wg (interleaved, so the offset of step j is a constant plus
  // wg * 32 bytes): column block j / 2, byte 32 (2 (j % 2) + wg) inside it. Descriptors are built as a
  // low word (address, LBO) plus a constant high word (SBO, swizzle), so a step costs one 32-bit add.
  const uint32_t q_lo = smem_desc_lo(s_q + wg * 32, 16);
  auto qk = [&](float (&sacc)[16], int stage) {
    const uint32_t k_lo = smem_desc_lo(s_kv + stage * KV_BYTES + wg * 32, 16);
#pragma unroll
    for (int j = 0; j < KS_WG; ++j) {
      const uint32_t qo = (j >> 1) * Q_BLK + (j & 1) * 64, ko = (j >> 1) * KV_BLK + (j & 1) * 64;
      wgmma_ss_m64n32<DT>(sacc, smem_desc_kmajor(q_lo + (qo >> 4)), smem_desc_kmajor(k_lo + (ko >> 4)), j > 0 ? 1 : 0);
    }
  };
  // PV: V rows 16 ks.. of the stage, columns of blocks [wg NVB, (wg+1) NVB).
  auto pv = [&](float (&o)[NV / 2], const uint32_t (&pa)[2][4], int stage) {
    const uint32_t vb = s_kv + stage * KV_BYTES + wg * NVB * KV_BLK;
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) wgmma_pv<DT, NV>(o, pa[ks], smem_desc(vb + ks * 16 * 128, KV_BLK, 1024));
  };

  // Rows of this thread's fragments may see cache rows [cb, vis): causal among the S new tokens.
  const int g0 = row0 + r0, g1 = row0 + r1;
  const int vis0 = g0 < MT ? min(end - (p.S - 1 - g0 / p.H), ce) : cb;
  const int vis1 = g1 < MT ? min(end - (p.S - 1 - g1 / p.H), ce) : cb;
  const float scale_log2 = p.sm_scale * kLog2e;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // running max (log2) and this thread's sums

  // Online softmax of `tile` (warpgroup 1 only) on its full scores sacc; P (fp32) into p0 (row r0), p1 (r1).
  auto softmax = [&](const float (&sacc)[16], int tile, float (&p0)[8], float (&p1)[8], float& a0, float& a1) {
    float x0[8], x1[8];
    const int t0 = cb + tile * N + 2 * tq;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      // Fragment q: row r0 columns 8q + 2tq + {0, 1}, row r1 the same columns.
      const int t = t0 + 8 * q;
      x0[2 * q] = t < vis0 ? sacc[4 * q] * scale_log2 : -INFINITY;
      x0[2 * q + 1] = t + 1 < vis0 ? sacc[4 * q + 1] * scale_log2 : -INFINITY;
      x1[2 * q] = t < vis1 ? sacc[4 * q + 2] * scale_log2 : -INFINITY;
      x1[2 * q + 1] = t + 1 < vis1 ? sacc[4 * q + 3] * scale_log2 : -INFINITY;
    }
    float mx0 = x0[0], mx1 = x1[0];
#pragma unroll
    for (int e = 1; e < 8; ++e) {
      mx0 = fmaxf(mx0, x0[e]);
      mx1 = fmaxf(mx1, x1[e]);
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    // Lazy rescaling as in v3: the running max moves only when a tile's max exceeds it by 8 (log2).
    const float mn0 = mx0 > m0 + 8.f ? mx0 : m0, mn1 = mx1 > m1 + 8.f ? mx1 : m1;
    const float mu0 = mn0 == -INFINITY ? 0.f : mn0, mu1 = mn1 == -INFINITY ? 0.f : mn1;
    a0 = mn0 == m0 ? 1.f : exp2f(m0 - mu0);
    a1 = mn1 == m1 ? 1.f : exp2f(m1 - mu1);
    m0 = mn0;
    m1 = mn1;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      p0[e] = exp2f(x0[e] - mu0);
      p1[e] = exp2f(x1[e] - mu1);
      sum0 += p0[e];
      sum1 += p1[e];
    }
    l0 = l0 * a0 + sum0;
    l1 = l1 * a1 + sum1;
  };

  // P into the A fragments of the two PV k-steps (keys 16 ks..): {row r0, keys 2tq..}, {r1, 2tq..},
  // {r0, 8+2tq..}, {r1, 8+2tq..}.
  auto pack_p = [&](uint32_t (&pa)[2][4], const float (&p0)[8], const float (&p1)[8]) {
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      T2 v0 = Tr::pack(p0[4 * ks], p0[4 * ks + 1]), v1 = Tr::pack(p1[4 * ks], p1[4 * ks + 1]);
      T2 v2 = Tr::pack(p0[4 * ks + 2], p0[4 * ks + 3]), v3 = Tr::pack(p1[4 * ks + 2], p1[4 * ks + 3]);
      pa[ks][0] = *reinterpret_cast<uint32_t*>(&v0);
      pa[ks][1] = *reinterpret_cast<uint32_t*>(&v1);
      pa[ks][2] = *reinterpret_cast<uint32_t*>(&v2);
      pa[ks][3] = *reinterpret_cast<uint32_t*>(&v3);
    }
  };

  // The exchange slot of this thread's fragment positions (thread t of either warpgroup holds the same
  // ones): four 16-byte entries, used in turn for warpgroup 0's partial scores (16 floats, read by
  // warpgroup 1), then the packed P of the tile (entries 0-1) and its row rescale factors (entry 2),
  // read by warpgroup 0.
  float4* slot = xchg + wtid;  // entry q at slot[q * 128]: a warp's accesses are consecutive, no bank conflicts
  // Warpgroup 0's half of the QK k-steps goes to warpgroup 1, which owns the softmax.
  auto send_partial = [&](const float (&sacc)[16]) {
#pragma unroll
    for (int q = 0; q < 4; ++q) slot[q * 128] = make_float4(sacc[4 * q], sacc[4 * q + 1], sacc[4 * q + 2], sacc[4 * q + 3]);
  };
  // Into new registers: writing sacc, an operand of the next QK, while PV is in flight would make ptxas
  // serialize every wgmma of the kernel (C7513).
  auto add_partial = [&](const float (&sacc)[16], float (&full)[16]) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float4 v = (DIAG & 2) ? make_float4(0.f, 0.f, 0.f, 0.f) : slot[q * 128];
      full[4 * q] = sacc[4 * q] + v.x;
      full[4 * q + 1] = sacc[4 * q + 1] + v.y;
      full[4 * q + 2] = sacc[4 * q + 2] + v.z;
      full[4 * q + 3] = sacc[4 * q + 3] + v.w;
    }
  };
  auto send_p = [&](const float (&p0)[8], const float (&p1)[8], float a0, float a1) {
    uint32_t packed[2][4];
    pack_p(packed, p0, p1);
    slot[0] = make_float4(__uint_as_float(packed[0][0]), __uint_as_float(packed[0][1]), __uint_as_float(packed[0][2]),
                          __uint_as_float(packed[0][3]));
    slot[128] = make_float4(__uint_as_float(packed[1][0]), __uint_as_float(packed[1][1]), __uint_as_float(packed[1][2]),
                          __uint_as_float(packed[1][3]));
    reinterpret_cast<float2*>(slot + 2 * 128)[0] = make_float2(a0, a1);
  };
  auto receive_p = [&](uint32_t (&pa)[2][4], float& a0, float& a1) {
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      const float4 v = slot[ks * 128];
      pa[ks][0] = __float_as_uint(v.x);
      pa[ks][1] = __float_as_uint(v.y);
      pa[ks][2] = __float_as_uint(v.z);
      pa[ks][3] = __float_as_uint(v.w);
    }
    const float2 a = reinterpret_cast<const float2*>(slot + 2 * 128)[0];
    a0 = a.x;
    a1 = a.y;
  };
  auto rescale_o = [&](float (&o)[NV / 2], float a0, float a1) {
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

  float sacc[16];
  float o[NV / 2];
#pragma unroll
  for (int e = 0; e < 16; ++e) sacc[e] = 0.f;
#pragma unroll
  for (int e = 0; e < NV / 2; ++e) o[e] = 0.f;
  uint32_t pa[2][4];
  float p0[8], p1[8];

  // Groups so far: Q, tiles 0..STAGES-2. Q and tile 0 must have landed.
  cp_async_wait<STAGES - 2>();
  fence_proxy_async();
  __syncthreads();
  fence_operand(sacc);
  wgmma_fence();
  qk(sacc, 0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_operand(sacc);
  if constexpr (!(DIAG & 2)) {
    if (wg == 0) send_partial(sacc);
    __syncthreads();
  }
  if (wg == 1) {
    float full[16], a0, a1;  // O is zero: nothing to rescale
    add_partial(sacc, full);
    softmax(full, 0, p0, p1, a0, a1);
    send_p(p0, p1, 1.f, 1.f);
    pack_p(pa, p0, p1);
  }

  // Every tile but the last: QK(it+1) beside PV(it). The last tile's PV follows the loop (peeled, so
  // the loop issues the same wgmma sequence every time). Warpgroup 1 runs the softmax of every tile;
  // warpgroup 0 gets P and the rescale factors through its exchange slot after the barrier [X].
  for (int it = 0; it + 1 < n_tiles; ++it) {
    // [X] Tile it+1 has landed (tile it+2 may still be in flight) and is visible to the async proxy;
    // every thread is past PV(it-1), so the stage of tile it-1 is free; P(it) is in the slots.
    cp_async_wait<STAGES - 3>();
    fence_proxy_async();
    __syncthreads();
    if (wg == 0) {
      float a0, a1;
      receive_p(pa, a0, a1);
      rescale_o(o, a0, a1);
    }

    fence_operand(sacc);
    fence_operand(o);
    fence_operand(pa);
    wgmma_fence();
    if constexpr (!(DIAG & 4)) qk(sacc, (it + 1) % STAGES);
    wgmma_commit();
    if constexpr (!(DIAG & 4)) pv(o, pa, it % STAGES);
    wgmma_commit();
    // Prefetch tile it+3 into the stage of tile it-1 (neither wgmma in flight reads it) while they run.
    if (!(DIAG & 1) && it + STAGES - 1 < n_tiles) load_tile(it + STAGES - 1, (it + STAGES - 1) % STAGES);
    cp_async_commit();
    wgmma_wait<1>();  // QK(it+1) done, PV(it) may still run
    fence_operand(sacc);
    if constexpr (!(DIAG & 2)) {
      if (wg == 0) send_partial(sacc);  // its slot's P(it) was read above
      __syncthreads();
    }
    float a0 = 1.f, a1 = 1.f;
    if (wg == 1) {
      float full[16];
      add_partial(sacc, full);
      softmax(full, it + 1, p0, p1, a0, a1);
      // The slot store depends on every exponential, so ptxas cannot hoist the PV wait above them.
      send_p(p0, p1, a0, a1);
    }
    // One wait for both warpgroups: a wait in each branch leaves ptxas unsure where PV's stage ends.
    wgmma_wait<0>();
    fence_operand(o);
    fence_operand(pa);
    if (wg == 1) {
      pack_p(pa, p0, p1);
      rescale_o(o, a0, a1);
    }
  }
  // Last tile: its stage landed before its QK; warpgroup 1's P is in pa, warpgroup 0 reads it.
  __syncthreads();
  if (wg == 0) {
    float a0, a1;
    receive_p(pa, a0, a1);
    rescale_o(o, a0, a1);
  }
  fence_operand(o);
  fence_operand(pa);
  wgmma_fence();
  pv(o, pa, (n_tiles - 1) % STAGES);
  wgmma_commit();
  wgmma_wait<0>();
  fence_operand(o);
  cp_async_wait<0>();

  // ---- epilogue: warpgroup 1 holds m and l; warpgroup 0 gets 1/l through entry 3 of its slot (P and
  // the factors, entries 0-2, may still be read). Each writes its R/2 columns.
  float inv0 = 0.f, inv1 = 0.f;
  if (wg == 1) {
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      l0 += __shfl_xor_sync(0xffffffffu, l0, off);
      l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
    inv0 = l0 > 0.f ? 1.f / l0 : 0.f;
    inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    reinterpret_cast<float2*>(slot + 3 * 128)[0] = make_float2(inv0, inv1);
    if (tq == 0) {
      const float lse0 = l0 > 0.f ? (m0 + __log2f(l0)) * kLn2 : -INFINITY;
      const float lse1 = l1 > 0.f ? (m1 + __log2f(l1)) * kLn2 : -INFINITY;
      float* dst = nsplit == 1 ? p.lse + static_cast<size_t>(b) * MT
                               : p.lse_partial + (static_cast<size_t>(b) * nsplit + split) * MT;
      if (g0 < MT) dst[g0] = lse0;
      if (g1 < MT) dst[g1] = lse1;
    }
  }
  __syncthreads();
  if (wg == 0) {
    const float2 inv = reinterpret_cast<const float2*>(slot + 3 * 128)[0];
    inv0 = inv.x;
    inv1 = inv.y;
  }
  const int col = wg * NV + 2 * tq;
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
    const int g = hi ? g1 : g0;
    if (g >= MT) continue;
    const float inv = hi ? inv1 : inv0;
    if (nsplit == 1) {
      T* out = static_cast<T*>(p.out_latent) + (static_cast<size_t>(b) * MT + g) * R + col;
#pragma unroll
      for (int j = 0; j < NV / 8; ++j) {
        *reinterpret_cast<T2*>(out + j * 8) = Tr::pack(o[4 * j + 2 * hi] * inv, o[4 * j + 2 * hi + 1] * inv);
      }
    } else {
      float* out = p.o_partial + ((static_cast<size_t>(b) * nsplit + split) * MT + g) * R + col;
#pragma unroll
      for (int j = 0; j < NV / 8; ++j) {
        *reinterpret_cast<float2*>(out + j * 8) = make_float2(o[4 * j + 2 * hi] * inv, o[4 * j + 2 * hi + 1] * inv);
      }
    }
  }
#else
  // Built without sm_90a: never dispatched (binding.cpp checks the loaded binary); fail loudly if it is.
  __trap();
#endif
}

}  // namespace mla

template <MlaDtype DT, int R, int P, int DIAG>
cudaError_t launch_mla_decode_wgmma(const MlaDecodeParams& params, cudaStream_t stream) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  constexpr size_t smem = mla_wgmma_smem_bytes(R, P);
  auto kernel = mla::mla_decode_wgmma_kernel<DT, R, P, DIAG>;
  static bool smem_set[64] = {};
  if (dev < 0 || dev >= 64 || !smem_set[dev]) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    if (dev >= 0 && dev < 64) smem_set[dev] = true;
  }
  const int MT = params.S * params.H;
  const dim3 grid(mla::ceil_div(MT, kMlaWgmmaMTile), params.num_splits, params.B);
  kernel<<<grid, 256, smem, stream>>>(params);
  err = cudaGetLastError();
  if (err != cudaSuccess || params.num_splits == 1) return err;
  return mla::launch_mla_combine<DT, R>(params, stream);
}

template <MlaDtype DT, int R, int P>
bool mla_wgmma_built() {
  // The sm_90a body exists only in an sm_90a cubin; a build without it has the 4-instruction trap stub.
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, mla::mla_decode_wgmma_kernel<DT, R, P>) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.binaryVersion == 90 && attr.numRegs >= 64;
}
