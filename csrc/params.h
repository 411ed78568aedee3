// Plain parameters of one decode call, shared by binding.cpp and the kernels: pointers, sizes and strides in
// elements. No torch and no device code.
#pragma once

#include <cstdint>

enum class MlaDtype { kBF16, kFP16 };

struct MlaDecodeParams {
  const void* q_latent;    // [B, S, H, R] query times W_UK; last dim contiguous
  const void* q_pe;        // [B, S, H, P] roped query; last dim contiguous
  const void* c_kv;        // [B, T, R] latent cache rows; last dim contiguous (may be a view of [B, T, R+P])
  const void* k_pe;        // [B, T, P] roped key rows; last dim contiguous (may be a view of [B, T, R+P])
  const int32_t* kv_start; // [B] first visible cache row of each sequence
  const int32_t* kv_end;   // [B] one past the last row visible to the last new token
  const int32_t* row_index;  // a paged cache: [B, T], sequence b's row t is pool row row_index[b T + t] (clamped to
                             // [0, pool_rows)); c_kv / k_pe are then pools [pool_rows, R] / [.., P]. Null otherwise.
  int pool_rows;
  void* out_latent;        // [B, S, H, R] contiguous, input dtype
  float* lse;              // [B, S, H] contiguous, natural log, -inf for a query that sees no row
  void* o_partial;         // [B, num_splits, S*H, R] split-KV partials in the input dtype (unused with one split)
  float* lse_partial;      // [B, num_splits, S*H] fp32 split-KV workspace (unused with one split)

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
  int pdl;         // 1: launch with programmatic dependent launch (compute capability >= 9.0)
  int tma;         // 1: the sm_90a kernels may load tiles by TMA where they serve (host-side only)

  // Per-CTA timeline, a profiling aid (dev/kernel_timeline.py): null except on the private op's calls that pass
  // one. [2][timeline_blocks][32]: the decode kernel's CTAs, then the combine's (layout at mla::TimelineSlot).
  unsigned long long* timeline;
  int timeline_blocks;
};

// Cache rows per pipeline stage of the mma.sync kernel.
constexpr int kMlaNTile = 32;
// Its pipeline depth: 4 stages where the device allows the shared memory (H100: 227 KB per block), else 3
// (A100: 163 KB).
constexpr int kMlaMinStages = 3;
constexpr int kMlaMaxStages = 4;
constexpr int kMlaMaxSplits = 128;
// The sm_90a kernels: 64-row cache tiles; the seesaw kernel's 64 query rows a CTA, the narrow kernel's 16.
constexpr int kMlaSeesawMTile = 64;
constexpr int kMlaSeesawNTile = 64;
constexpr int kMlaNarrowMTile = 16;
