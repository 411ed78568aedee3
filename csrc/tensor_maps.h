// Host side of the TMA paths: tensor maps over the query and cache tensors (cuTensorMapEncodeTiled, reached through
// the runtime so the extension does not link libcuda), cached while the tensors stay the same, and the structs that
// carry them to a kernel as a __grid_constant__ parameter. Used by every kernel's TMA tiles on sm_90a.
#pragma once

#include <cuda_runtime.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <array>
#include <cstdint>

#include <cuda.h>  // CUtensorMap (a plain 128-byte struct; nothing here links libcuda)

#include <type_traits>

#include "params.h"

namespace mla {

// c_kv and k_pe as 3-D {columns, rows T, sequences B}.
struct CacheMaps {
  CUtensorMap c_kv;
  CUtensorMap k_pe;
};
// q_latent and q_pe as 4-D {columns, H, S, B}.
struct QMaps {
  CUtensorMap q_latent;
  CUtensorMap q_pe;
};
// Both, for a kernel whose tiles go by TMA (the query maps unset where its query does not).
struct TileMaps {
  CUtensorMap q_latent;
  CUtensorMap q_pe;
  CUtensorMap c_kv;
  CUtensorMap k_pe;
};
// A kernel template's maps parameter: the maps where any of its tiles go by TMA, else none (all by cp.async).
struct NoMaps {};
template <bool TMAQ, bool TMAK>
using KernelMaps = std::conditional_t<TMAQ || TMAK, TileMaps, NoMaps>;

// cuTensorMapEncodeTiled from the driver through the runtime, so the extension does not link libcuda; null
// where the driver lacks it.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      f = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A 16-bit tensor (last dim contiguous) as a tiled map of `rank` dims, innermost first: `dims`, the element
// strides of dims 1.. (a size-1 dim's stride is arbitrary in torch: replaced by a dense one), `box` in the
// 128-byte swizzle (our shared layout); out-of-range elements read as zeros. False if the driver refuses it.
// No L2 promotion: a box row is 128 bytes of a cache row 1152 bytes long, and promoting each fill to 256 bytes
// was measured slower (docs/KERNEL.md).
template <MlaDtype DT>
bool encode_map(CUtensorMap* map, const void* base, int rank, const int64_t* dims, const int64_t* strides,
                const uint32_t* box) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  cuuint64_t d[4], st[3];
  cuuint32_t bx[4], elem_strides[4] = {1, 1, 1, 1};
  int64_t dense = dims[0];
  for (int i = 0; i < rank; ++i) {
    d[i] = static_cast<cuuint64_t>(dims[i]);
    bx[i] = box[i];
    if (i > 0) {
      const int64_t stride = dims[i] > 1 ? strides[i - 1] : dense;
      st[i - 1] = static_cast<cuuint64_t>(stride) * 2;  // bytes
      dense = stride * dims[i];
    }
  }
  return encode(map, DT == MlaDtype::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, rank,
                const_cast<void*>(base), d, st, bx, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The last call's maps, re-encoded only when the tensors (pointers, sizes, strides: `key`) change: decode steps
// of one model reuse the cache tensors, and static buffers (CUDA graphs) the query ones.
template <typename Maps, size_t K>
struct MapCache {
  std::array<int64_t, K> key{};
  Maps maps{};
  bool valid = false;
  template <typename Encode>
  bool get(const std::array<int64_t, K>& k, Maps* out, Encode encode) {
    if (!(valid && k == key)) {
      valid = encode(&maps);
      key = k;
      if (!valid) return false;
    }
    *out = maps;
    return true;
  }
};
inline int64_t ptr_key(const void* p) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p)); }

// q_latent and q_pe as {cols, H, S, B}, box {64, BOX, 1, 1}: BOX heads of one token a 64-column block (seesaw: 64,
// where H is a multiple of 64, seesaw_tma_q_serves; mma: its M tile, mma_tma_serves).
template <MlaDtype DT, int BOX>
bool query_maps(const MlaDecodeParams& p, int R, int P, QMaps* maps) {
  thread_local MapCache<QMaps, 11> cache;
  const std::array<int64_t, 11> key{ptr_key(p.q_latent), ptr_key(p.q_pe), p.H,         p.S,         p.B,       p.q_latent_sh,
                                    p.q_latent_ss,        p.q_latent_sb,      p.q_pe_sh, p.q_pe_ss, p.q_pe_sb};
  return cache.get(key, maps, [&](QMaps* m) {
    const uint32_t box[4] = {64, BOX, 1, 1};
    const int64_t l_dims[4] = {R, p.H, p.S, p.B}, r_dims[4] = {P, p.H, p.S, p.B};
    const int64_t l_st[3] = {p.q_latent_sh, p.q_latent_ss, p.q_latent_sb}, r_st[3] = {p.q_pe_sh, p.q_pe_ss, p.q_pe_sb};
    return encode_map<DT>(&m->q_latent, p.q_latent, 4, l_dims, l_st, box) &&
           encode_map<DT>(&m->q_pe, p.q_pe, 4, r_dims, r_st, box);
  });
}

// c_kv and k_pe as {cols, T, B}, box {64, ROWS, 1}: a whole cache tile (seesaw and narrow: 64 rows, mma: 32).
template <MlaDtype DT, int ROWS>
bool cache_maps(const MlaDecodeParams& p, int R, int P, CacheMaps* maps) {
  thread_local MapCache<CacheMaps, 8> cache;
  const std::array<int64_t, 8> key{ptr_key(p.c_kv), ptr_key(p.k_pe), p.T, p.B, p.c_kv_st, p.c_kv_sb, p.k_pe_st, p.k_pe_sb};
  return cache.get(key, maps, [&](CacheMaps* m) {
    const uint32_t box[3] = {64, ROWS, 1};
    const int64_t c_dims[3] = {R, p.T, p.B}, k_dims[3] = {P, p.T, p.B};
    const int64_t c_st[2] = {p.c_kv_st, p.c_kv_sb}, k_st[2] = {p.k_pe_st, p.k_pe_sb};
    return encode_map<DT>(&m->c_kv, p.c_kv, 3, c_dims, c_st, box) && encode_map<DT>(&m->k_pe, p.k_pe, 3, k_dims, k_st, box);
  });
}

// The query maps (box QBOX heads, where `with_query`) and the cache's (box KROWS rows) together: seesaw (64 / 64)
// and mma (its M tile / 32).
template <MlaDtype DT, int QBOX, int KROWS>
bool tile_maps(const MlaDecodeParams& p, int R, int P, bool with_query, TileMaps* maps) {
  QMaps q{};
  CacheMaps kv;
  if ((with_query && !query_maps<DT, QBOX>(p, R, P, &q)) || !cache_maps<DT, KROWS>(p, R, P, &kv)) return false;
  *maps = TileMaps{q.q_latent, q.q_pe, kv.c_kv, kv.k_pe};
  return true;
}

}  // namespace mla
