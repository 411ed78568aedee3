// Plain parameters of the absorbed MLA decode kernel, shared by binding.cpp and the .cu files.
// No torch and no device code here: pointers, sizes, strides in elements, and the host-side
// split-KV heuristic (it needs only host-known shapes, never the lengths on the GPU).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

enum class MlaDtype { kBF16, kFP16 };

struct MlaDecodeParams {
  const void* q_latent;    // [B, S, H, R] query times W_UK; last dim contiguous
  const void* q_pe;        // [B, S, H, P] roped query; last dim contiguous
  const void* c_kv;        // [B, T, R] latent cache rows; last dim contiguous (may be a view of [B, T, R+P])
  const void* k_pe;        // [B, T, P] roped key rows; last dim contiguous (may be a view of [B, T, R+P])
  const int32_t* kv_start; // [B] first visible cache row of each sequence
  const int32_t* kv_end;   // [B] one past the last row visible to the last new token
  void* out_latent;        // [B, S, H, R] contiguous, input dtype
  float* lse;              // [B, S, H] contiguous, natural log, -inf for a query that sees no row
  void* o_partial;         // [B, num_splits, S*H, R] split-KV partials (unused when num_splits == 1): the input
                           // dtype, or fp32 when partial_f32 is set
  float* lse_partial;      // [B, num_splits, S*H] fp32 split-KV workspace (unused when num_splits == 1)

  int64_t q_latent_sb, q_latent_ss, q_latent_sh;  // strides of q_latent in elements
  int64_t q_pe_sb, q_pe_ss, q_pe_sh;              // strides of q_pe in elements
  int64_t c_kv_sb, c_kv_st;                       // strides of c_kv in elements
  int64_t k_pe_sb, k_pe_st;                       // strides of k_pe in elements

  int B;           // batch
  int S;           // new query tokens per sequence
  int H;           // query heads
  int T;           // cache capacity (rows addressable per sequence)
  int num_splits;  // split-KV factor (1: the main kernel writes out_latent and lse itself)
  float sm_scale;  // softmax scale of the un-absorbed head dim
  int pdl;         // 1: launch with programmatic dependent launch (compute capability >= 9.0 only)
  int partial_f32; // 1: split partials in fp32; 0: in the input dtype (half the bytes; pack_out in mla_decode.cuh)

  // Per-CTA timeline, a profiling aid (scripts/kernel_timeline.py): null unless the _timeline hook set it.
  // [2][timeline_blocks][32]: the decode kernel's CTAs, then the combine's (layout at mla::TimelineSlot).
  unsigned long long* timeline;
  int timeline_blocks;
  int tma_q;  // 1: v7 and the mma.sync kernel may load their query tile by TMA (mla_seesaw_tma_q_serves,
              // mla_decode_tma_q_serves); set only where the sm_90a bodies are loaded; host-side only
  int tma_kv; // 1: v7 (R = 512, the regular grid) and the mma.sync kernel (with its query by TMA) may load their
              // cache tiles by TMA; host-side only

  // v7's balanced ("planned") grid: plan_ctas CTAs (0: the regular grid) share the work evenly (mla_plan_start);
  // a CTA's cut items go to its two partial slots ([2 plan_ctas][64] rows of o_partial / lse_partial), and
  // CTA 0 writes the per-sequence pair offsets [B + 1] to plan_offsets for the combine.
  int plan_ctas;
  int32_t* plan_offsets;
};

// Cache rows per pipeline stage.
constexpr int kMlaNTile = 32;
// Pipeline depth: 4 stages where the device allows the shared memory (H100: 227 KB per block),
// else 3 (A100: 163 KB).
constexpr int kMlaMinStages = 3;
constexpr int kMlaMaxStages = 4;
constexpr int kMlaMaxSplits = 128;

// Query rows of (s, h) pairs one CTA owns: 16 when S*H <= 16 (16 heads, one token: half the
// tensor work of a 32-row tile), else 32; S*H rows are cut into tiles of this many.
inline int mla_decode_m_tile(int S, int H) { return S * H <= 16 ? 16 : 32; }

// Split-KV factor from host-known shapes only (T is the capacity, not a length: lengths live on
// the GPU and are never read here). One CTA per SM (registers and ~190 KB of shared memory), so
// fill one wave: splits = floor(SMs / (B * m_tiles)), with at least two 32-row tiles of capacity a split
// unless that leaves fewer than 32 splits (then one tile a split, up to 32). Fitted to a forced-split sweep
// at B = 1 on the H200 (5a48c3d): H = 16 at 4K 10.3 us with 64 splits, 11.8 with 128; at 1K 7.1 us with 32
// splits, 7.8 with 16; H = 128 at 1K 12.2 us with 32, 13.0 with 16. The kernel cuts each sequence's actual
// range evenly, so a short sequence in a long buffer still gets balanced splits (the surplus ones are empty
// and exit at once).
inline int mla_num_splits_for(int B, int S, int H, int T, int num_sms, int m_tile) {
  const long m_tiles = (static_cast<long>(S) * H + m_tile - 1) / m_tile;
  const long base = static_cast<long>(B) * m_tiles;
  if (base <= 0 || T <= 0) return 1;
  long splits = num_sms / base;
  const long tiles = (T + kMlaNTile - 1) / kMlaNTile;
  const long by_len = tiles / 2 > 32 ? tiles / 2 : (tiles < 32 ? tiles : 32);
  if (splits > by_len) splits = by_len;
  if (splits > kMlaMaxSplits) splits = kMlaMaxSplits;
  return splits < 1 ? 1 : static_cast<int>(splits);
}
inline int mla_decode_num_splits(int B, int S, int H, int T, int num_sms) {
  return mla_num_splits_for(B, S, H, T, num_sms, mla_decode_m_tile(S, H));
}

// Dynamic shared memory of the main kernel, 2-byte inputs (see mla_decode.cuh): `stages` cache
// tiles [32][R+P+8] (the Q tile is staged in the last one before the loop starts), the partial
// scores [4][m_tile][40] fp32, the probabilities [m_tile][40], per-row alpha/m/l.
// tma_q: the variant that loads its query tile by TMA (mla_decode_tma_q_serves) adds 48 B of mbarriers (the query
// tile's and, with its cache tiles by TMA, one a stage), 1 KB of alignment slack and the tile in 64-column blocks of
// 128-byte rows. (Its TMA cache stages fit in the padded stages' bytes.)
constexpr size_t mla_decode_smem_bytes(int R, int P, int m_tile, int stages, bool tma_q = false) {
  const size_t row = static_cast<size_t>(R + P + 8) * 2;  // +8 elements: conflict-free ldmatrix
  const size_t kv = static_cast<size_t>(stages) * kMlaNTile * row;
  const size_t s_part = static_cast<size_t>(4) * m_tile * (kMlaNTile + 8) * 4;
  const size_t probs = static_cast<size_t>(m_tile) * (kMlaNTile + 8) * 2;
  const size_t stats = static_cast<size_t>(3) * m_tile * 4;
  const size_t q_tile = tma_q ? 48 + 1024 + static_cast<size_t>((R + P) / 64) * m_tile * 128 : 0;
  return kv + s_part + probs + stats + q_tile;
}
// The mma.sync kernel loads its query tile by TMA (sm_90a) where every block is 128-byte rows (R = 512, P = 64) and
// each M tile is m_tile heads of one token (the maps' box; heads past H read as zeros); its cache tiles too there
// (TMAK, the tma_kv switch).
inline bool mla_decode_tma_q_serves(int R, int P, int S, int H, int m_tile) {
  return R == 512 && P == 64 && (S == 1 || H % m_tile == 0);
}

// Host launcher: main kernel, then the LSE combine when num_splits > 1. *q_by_tma / *kv_by_tma (if given) say
// whether the query tile / the cache tiles went by TMA. Instantiated in mla_decode_<dtype>_r<R>.cu for the
// supported (dtype, R, P).
template <MlaDtype DT, int R, int P>
cudaError_t launch_mla_decode(const MlaDecodeParams& params, cudaStream_t stream, bool* q_by_tma, bool* kv_by_tma);

// 64-column blocks of a cache row in the sm_90a kernel's shared-memory layout (R latent + one rope block).
constexpr int mla_wgmma_col_blocks(int R, int P) { return (R + P + 63) / 64; }

// ---- sm_90a seesaw path (mla_decode_seesaw.cuh, kernel v7): 64 query rows a CTA, two warpgroups that each
// own one 64-row cache tile of every pair (QK over all R+P columns, its own softmax) and one half of the
// output columns (PV over both tiles of the pair), two tile buffers reloaded part by part as they free up.
constexpr int kMlaSeesawMTile = 64;
constexpr int kMlaSeesawNTile = 64;
// mbarriers: v7 has one a 64-column block of each buffer (its cache tiles land block by block) and one for a query
// tile by TMA; v8 one a buffer part and one "part free" a part (8).
constexpr int mla_seesaw_mbarriers(int R, int P) { return 2 * mla_wgmma_col_blocks(R, P) + 1; }
// 1 KB alignment slack + Q and two cache tiles, each [blocks][64 rows][128 B] + exchange slots (4 x 1 KB)
// + the mbarriers (R = 512: 226,456 B of the H100/H200's 232,448). Every v7 / v8 kernel takes this size.
constexpr size_t mla_seesaw_smem_bytes(int R, int P) {
  return 1024 + static_cast<size_t>(3) * mla_wgmma_col_blocks(R, P) * kMlaSeesawNTile * 128 + 4 * 1024 +
         8 * static_cast<size_t>(mla_seesaw_mbarriers(R, P));
}
// One CTA per SM; each split gets at least one pair of tiles (128 rows) of capacity. The kernel cuts a range into
// chunks of whole pairs, so n splits of T rows fill only ceil(T / per) of them (per = ceil(T / n) rounded up to a
// pair): the count is trimmed to those, so no CTA of a full-length sequence is empty (batch 1 at 16K-64K, H = 128:
// 64 splits instead of 66, 0.5-0.7 us faster on the H200, session 9 run 6).
inline int mla_seesaw_num_splits(int B, int S, int H, int T, int num_sms) {
  constexpr long kPair = 2 * kMlaSeesawNTile;
  const long m_tiles = (static_cast<long>(S) * H + kMlaSeesawMTile - 1) / kMlaSeesawMTile;
  const long base = static_cast<long>(B) * m_tiles;
  if (base <= 0 || T <= 0) return 1;
  long splits = num_sms / base;
  const long by_len = (T + kPair - 1) / kPair;
  if (splits > by_len) splits = by_len;
  if (splits > kMlaMaxSplits) splits = kMlaMaxSplits;
  if (splits <= 1) return 1;
  const long per = ((T + splits - 1) / splits + kPair - 1) / kPair * kPair;
  return static_cast<int>((T + per - 1) / per);
}
// v7 loads its 64-row query tile by TMA (4-D maps over q_latent / q_pe, one box of 64 heads a 64-column block)
// where R = 512 (128-byte rows in every block, like the cp.async layout) and H is a multiple of 64. (H = 16 by
// 16-head boxes measured no faster: its v7 cells are long runs, 1-1.5 % slower at 16K, session 7.)
inline bool mla_seesaw_tma_q_serves(int R, int H) { return R == 512 && H % kMlaSeesawMTile == 0; }
// Host launcher (main kernel, then the shared LSE combine) and whether the binary holds the sm_90a body.
// *q_by_tma / *kv_by_tma (if given) say whether the query tile / the cache tiles went by TMA. Instantiated in
// mla_decode_seesaw_<dtype>_r<R>.cu.
template <MlaDtype DT, int R, int P>
cudaError_t launch_mla_decode_seesaw(const MlaDecodeParams& params, cudaStream_t stream, bool* q_by_tma,
                                     bool* kv_by_tma);
template <MlaDtype DT, int R, int P>
bool mla_seesaw_built();

// ---- sm_90a pair path (kernel v8): v7's seesaw order with the two 64-row query tiles of a (sequence, split)
// as a 2-CTA cluster that fetches each cache tile once, by TMA multicast into both. It serves R = 512 (the
// 64-column rope block: 128-byte rows, like the latent blocks) with an even count of query tiles and more
// than 32 query rows (v7's late-QK_b order, which it lacks, serves fewer).
inline bool mla_pair_serves(int R, int S, int H) {
  const long rows = static_cast<long>(S) * H;
  return R == 512 && rows > 32 && ((rows + kMlaSeesawMTile - 1) / kMlaSeesawMTile) % 2 == 0;
}
// ---- sm_90a narrow kernel (mla_decode_narrow.cuh, kernel v9): up to 16 query rows a CTA as the N dimension of
// wgmma (S^T = K Q^T, O^T = V^T P^T) instead of padded to v7's 64-row M: a quarter of v7's tensor work where
// S*H <= 16 (H = 16 at one token). Each of its two warpgroups streams every other 64-row cache tile of the split
// through a buffer of its own (by TMA) with its own online softmax; the two merge at the end. R = 512 only (the
// 64-column rope block: 128-byte rows in every block, one TMA swizzle).
constexpr int kMlaNarrowMTile = 16;
inline bool mla_narrow_serves(int R, int P, int S, int H) {
  return R == 512 && P == 64 && static_cast<long>(S) * H <= kMlaNarrowMTile;
}
// 1 KB alignment slack + Q [NB][16 rows][128 B] + two cache tiles [NB][64][128 B] + P^T [2][16][128 B] + the
// softmax exchange (2 KB) + an mbarrier a 64-column block of each buffer (R = 512: 173,200 B).
constexpr size_t mla_narrow_smem_bytes(int R, int P) {
  return 1024 + static_cast<size_t>(mla_wgmma_col_blocks(R, P)) * (kMlaNarrowMTile + 2 * kMlaSeesawNTile) * 128 +
         2 * kMlaNarrowMTile * 128 + 2048 + 16 * static_cast<size_t>(mla_wgmma_col_blocks(R, P));
}
// Host launcher (the main kernel, then the shared LSE combine). *launched is false where it does not serve or the
// cache's tensor maps do not encode (the caller then runs v7). Instantiated in mla_decode_narrow_<dtype>_r512.cu.
template <MlaDtype DT, int R, int P>
cudaError_t launch_mla_decode_narrow(const MlaDecodeParams& params, cudaStream_t stream, bool* launched);

// ---- v7's balanced grid ("planned"): work counted in pairs of 64-row cache tiles. Sequence b has
// p_b = max(1, ceil(len_b / 128)) pairs, flattened sequence-major; each of the query's MTL m-tiles has a lane of
// G / MTL CTAs, and share j of a lane takes the pairs [mla_plan_start(j), mla_plan_start(j + 1)): every SM gets the
// same share, where the regular grid (one CTA an item and split) leaves SMs idle in its last wave (B = 64 at
// H = 128: 128 CTAs on 132 SMs; B = 128: a second wave of 124). A sequence cut between CTAs is merged by
// mla_plan_combine_kernel. Lengths are read on the GPU only: each CTA computes the offsets itself
// (B < kMlaPlanMaxB), so the plan needs no kernel or host sync of its own. Opt-in (MLA_PATCH_PLAN=1): measured
// slower than the regular grid everywhere (session 8, docs/KERNEL.md), since each extra item a CTA takes pays a
// prologue and an epilogue with nothing to hide under; what would make it pay is loading the next item's query and
// first tiles under the current item's last pair.
constexpr int kMlaPlanMaxB = 1024;
__host__ __device__ inline int mla_plan_start(int c, int W, int G) {
  return static_cast<int>(static_cast<long long>(c) * W / G);
}
// The CTA whose share holds pair x (the largest c with mla_plan_start(c) <= x).
__host__ __device__ inline int mla_plan_cta_of(int x, int W, int G) {
  return static_cast<int>((static_cast<long long>(x + 1) * G - 1) / W);
}
// Extra shared memory of a planned kernel: the offsets [kMlaPlanMaxB + 1], 8 warp sums, the loop state (8 ints).
constexpr size_t kMlaPlanSmemBytes = 4 * (kMlaPlanMaxB + 1 + 8 + 8);
// Whether the planned grid can serve a call: all pair counts fit an int, few enough sequences for the per-CTA
// offsets, and a v7 order the planned kernel is built for (every v7 kernel has a planned twin).
inline bool mla_plan_serves(int B, int S, int H, long long T) {
  const long long m_tiles = (static_cast<long long>(S) * H + kMlaSeesawMTile - 1) / kMlaSeesawMTile;
  return B < kMlaPlanMaxB && m_tiles <= 16 &&
         static_cast<long long>(B) * ((T + 2 * kMlaSeesawNTile - 1) / (2 * kMlaSeesawNTile)) < (1LL << 30);
}

// Host launcher: v8 where it serves and the cache's tensor maps encode, else v7 (*launched_pair says which;
// *q_by_tma, *kv_by_tma as for launch_mla_decode_seesaw). Instantiated for R = 512 in
// mla_decode_seesaw_<dtype>_r512.cu.
template <MlaDtype DT, int R, int P>
cudaError_t launch_mla_decode_pair(const MlaDecodeParams& params, cudaStream_t stream, bool* launched_pair,
                                   bool* q_by_tma, bool* kv_by_tma);
// 2-CTA clusters of the pair kernel the device runs at once (0 if it cannot run it): splits are sized so the
// grid is one wave of them.
template <MlaDtype DT, int R, int P>
int mla_pair_max_clusters();
