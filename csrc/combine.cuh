// The LSE combine of split-KV partials, shared by every decode kernel: each kernel's launcher runs it after the
// main kernel when num_splits > 1. Partials are normalized rows in the input dtype, with their lse in fp32.
#pragma once

#include "common.cuh"

namespace mla {


// One piece of a log-sum-exp merge of normalized rows: the running max m, weight sum and VEC accumulated columns
// move to max(m, l) (m is the same for every thread that reads the same lse), then add the piece's weight times its
// columns v (VEC partial elements of the input dtype in 16 bytes). An empty piece (l = -inf, its
// row never written) gets weight 0 and its loaded values, which may be NaN, are discarded by a select.
template <MlaDtype DT, int VEC>
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
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = Tr::unpack(*reinterpret_cast<const T2*>(&words[k]));
    x[2 * k] = f.x;
    x[2 * k + 1] = f.y;
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
// load a split: 8 columns of 16-bit partials) of one output row, and JG threads of different split
// groups share those columns; a block holds RB rows x NC column threads x JG groups over a CW-column chunk.
// One pass: thread (row, group jg, column c) walks splits jg, jg + JG, ... with an online max over their lse
// (the same for every thread of a group: broadcast loads), loading DEPTH splits' lse and partial columns at
// once, so the lse and the partials are in flight together. The JG groups meet in shared memory.
// Shapes (launch_combine): few rows (batch 1) take 128-column chunks and several split groups, so the many
// splits are read by more blocks and more loads are in flight; many rows take whole rows, one group, and
// DEPTH = 4 where there are at most 4 splits (at 8 the unused load slots cost registers, so fewer blocks fit
// an SM).
// Empty splits (lse = -inf, rows never written) get weight 0 and their loaded values are discarded by a select,
// never multiplied (they may be NaN).
template <MlaDtype DT, int R, int CW, int JG, int DEPTH>
__global__ void __launch_bounds__(128) combine_kernel(const MlaDecodeParams p) {
  using T = typename DtypeTraits<DT>::T;
  constexpr int VEC = 8, NC = CW / VEC, RB = 128 / (NC * JG), CHUNKS = R / CW;
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
  const T* op = static_cast<const T*>(p.o_partial) + (b * ns * MT + g) * R + col;
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
    for (int u = 0; u < DEPTH; ++u) merge_piece<DT>(l[u], v[u], m, wsum, acc);
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

// The combine's block shapes: few rows (batch 1) take 128-column chunks and several split groups; whole rows and
// one group from this many (b, query row) pairs on (docs/KERNEL.md).
constexpr int kCombineGroupedMaxRows = 128;

// Launched with programmatic dependent launch like the decode kernels, at any split count (docs/KERNEL.md).
template <MlaDtype DT, int R>
cudaError_t launch_combine(const MlaDecodeParams& p, cudaStream_t stream) {
  constexpr int VEC = 8;
  const long long rows = static_cast<long long>(p.B) * p.S * p.H;
  if (rows <= kCombineGroupedMaxRows) {
    constexpr int CW = 128, JG = 128 / (CW / VEC);
    return launch_kernel(combine_kernel<DT, R, CW, JG, 8>, dim3(rows * (R / CW)), 128, 0, stream, p);
  }
  constexpr int RB = 128 / (R / VEC);
  const dim3 grid((rows + RB - 1) / RB);
  return p.num_splits <= 4 ? launch_kernel(combine_kernel<DT, R, R, 1, 4>, grid, 128, 0, stream, p)
                           : launch_kernel(combine_kernel<DT, R, R, 1, 8>, grid, 128, 0, stream, p);
}

}  // namespace mla
