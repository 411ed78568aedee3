// The decode kernels as the host sees them: what each serves, the shared memory it takes, and its launcher.
// One entry per kernel; the choice between them is dispatch.h's, the kernels themselves are in kernel_*.cuh.
//   mma     kernel_mma.cuh     mma.sync, every GPU from sm_80; 16 or 32 query rows and 32 cache rows a tile
//   seesaw  kernel_seesaw.cuh  sm_90a wgmma, 64 query rows and 64-row cache tiles in pairs (two warpgroups)
//   narrow  kernel_narrow.cuh  sm_90a wgmma with the heads as N: up to 16 query rows, R = 512 only
// Every launcher runs its kernel and then, with more than one split, the shared LSE combine (combine.cuh).
#pragma once

#include <cstddef>

#include <cuda_runtime_api.h>

#include "params.h"

// Values are the private op's kernel ids (binding.cpp) and the names of mla_patch/kernel_probe.py's KERNELS.
enum class Kernel : int { kMma = 0, kSeesaw = 1, kNarrow = 2 };

// What a launcher launched: the kernel (the narrow launcher runs seesaw where its tensor maps do not encode) and
// whether the query and cache tiles went by TMA.
struct Launched {
  Kernel kernel = Kernel::kMma;
  bool q_tma = false;
  bool kv_tma = false;
};

// ---- mma: query rows of (s, h) pairs a CTA owns: 16 where S*H <= 16 (half the tensor work of a 32-row tile).
inline int mma_m_tile(int S, int H) { return S * H <= 16 ? 16 : 32; }
// Dynamic shared memory, 2-byte inputs: `stages` cache tiles [32][R+P+8] (the query tile is staged in the last
// one before the loop starts), the partial scores [4][m_tile][40] fp32, the probabilities [m_tile][40], per-row
// alpha/m/l. With its query tile by TMA: 48 B of mbarriers (the query's and one a stage for TMA cache tiles), 1 KB
// of alignment slack and the tile in 64-column blocks of 128-byte rows (its TMA cache stages fit in the padded
// stages' bytes).
constexpr size_t mma_smem_bytes(int R, int P, int m_tile, int stages, bool tma = false) {
  const size_t row = static_cast<size_t>(R + P + 8) * 2;  // +8 elements: conflict-free ldmatrix
  const size_t kv = static_cast<size_t>(stages) * kMlaNTile * row;
  const size_t s_part = static_cast<size_t>(4) * m_tile * (kMlaNTile + 8) * 4;
  const size_t probs = static_cast<size_t>(m_tile) * (kMlaNTile + 8) * 2;
  const size_t stats = static_cast<size_t>(3) * m_tile * 4;
  const size_t q_tile = tma ? 48 + 1024 + static_cast<size_t>((R + P) / 64) * m_tile * 128 : 0;
  return kv + s_part + probs + stats + q_tile;
}
// On sm_90a its query and cache tiles go by TMA where every block is 128-byte rows (R = 512, P = 64) and each M
// tile is heads of one token (the query maps' box; heads past H read as zeros).
inline bool mma_tma_serves(int R, int P, int S, int H) {
  return R == 512 && P == 64 && (S == 1 || H % mma_m_tile(S, H) == 0);
}

// ---- sm_90a: 64-column blocks of a cache row in the wgmma kernels' shared layout (R latent + one rope block).
constexpr int wgmma_col_blocks(int R, int P) { return (R + P + 63) / 64; }

// ---- seesaw: mbarriers, one a 64-column block of each buffer and one for a query tile by TMA.
constexpr int seesaw_mbarriers(int R, int P) { return 2 * wgmma_col_blocks(R, P) + 1; }
// 1 KB alignment slack + the query and two cache tiles, each [blocks][64 rows][128 B] + exchange slots (4 x 1 KB)
// + the mbarriers (R = 512: 226,456 B of the H100/H200's 232,448).
constexpr size_t seesaw_smem_bytes(int R, int P) {
  return 1024 + static_cast<size_t>(3) * wgmma_col_blocks(R, P) * kMlaSeesawNTile * 128 + 4 * 1024 +
         8 * static_cast<size_t>(seesaw_mbarriers(R, P));
}
// Its query tile by TMA (4-D maps, one box of 64 heads a 64-column block) where R = 512 (128-byte rows in every
// block) and H is a multiple of 64; its cache tiles by TMA where R = 512.
inline bool seesaw_tma_q_serves(int R, int H) { return R == 512 && H % kMlaSeesawMTile == 0; }

// ---- narrow: R = 512 (the 64-column rope block: 128-byte rows in every block, one TMA swizzle), S*H <= 16.
inline bool narrow_serves(int R, int P, int S, int H) {
  return R == 512 && P == 64 && static_cast<long>(S) * H <= kMlaNarrowMTile;
}
// 1 KB alignment slack + Q [NB][16 rows][128 B] + two cache tiles [NB][64][128 B] + P^T [2][16][128 B] + the
// softmax exchange (2 KB) + an mbarrier a 64-column block of each buffer (R = 512: 173,200 B).
constexpr size_t narrow_smem_bytes(int R, int P) {
  return 1024 + static_cast<size_t>(wgmma_col_blocks(R, P)) * (kMlaNarrowMTile + 2 * kMlaSeesawNTile) * 128 +
         2 * kMlaNarrowMTile * 128 + 2048 + 16 * static_cast<size_t>(wgmma_col_blocks(R, P));
}

// Launchers, instantiated in kernel_<name>_<dtype>_r<R>.cu for (bf16, fp16) x (R, P) in {(512, 64), (256, 32)}
// (narrow: R = 512 only). They take params.num_splits as given; *ran says what they launched.
template <MlaDtype DT, int R, int P>
cudaError_t launch_mma(const MlaDecodeParams& params, cudaStream_t stream, Launched* ran);
template <MlaDtype DT, int R, int P>
cudaError_t launch_seesaw(const MlaDecodeParams& params, cudaStream_t stream, Launched* ran);
template <MlaDtype DT, int R, int P>
cudaError_t launch_narrow(const MlaDecodeParams& params, cudaStream_t stream, Launched* ran);
// Whether the loaded binary holds the sm_90a bodies (a build without 90a has trap stubs in their place).
bool sm90a_kernels_built();
