// mbarrier, thread-block-cluster and bulk-tensor-copy (TMA) wrappers for the sm_90a code (mla_decode_seesaw.cuh:
// v7's query and cache tiles by TMA, v8's cache tiles by TMA multicast; mla_decode.cuh: the mma.sync kernel's query
// and cache tiles by TMA). The cluster, expect-tx, fence and copy wrappers have empty bodies outside sm_90a (never
// reached there).
#pragma once
#include <cstdint>
#include <type_traits>

#include <cuda.h>  // CUtensorMap (a plain 128-byte struct; nothing here links libcuda)

namespace mla {

// The tensor maps of the cache, built on the host (launch_mla_decode_pair) and passed by value as a
// __grid_constant__ kernel parameter: c_kv and k_pe as 3-D {columns, rows T, sequences B}.
struct PairMaps {
  CUtensorMap c_kv;
  CUtensorMap k_pe;
};
// v7 with its query tile by TMA: q_latent and q_pe as 4-D {columns, H, S, B} with a {64, 64, 1, 1} box.
struct QMaps {
  CUtensorMap q_latent;
  CUtensorMap q_pe;
};
// v7 with its cache tiles by TMA: c_kv and k_pe as PairMaps' but with a whole 64-row tile a box ({64, 64, 1}), and
// QMaps' query maps where the query goes by TMA too (else unset).
struct TileMaps {
  CUtensorMap q_latent;
  CUtensorMap q_pe;
  CUtensorMap c_kv;
  CUtensorMap k_pe;
};
// The kernel template's maps parameter: v8's, v7's query (and cache) maps, or empty (v7 all by cp.async).
struct NoMaps {};
template <bool PAIR, bool TMAQ, bool TMAK>
using KernelMaps =
    std::conditional_t<PAIR, PairMaps, std::conditional_t<TMAK, TileMaps, std::conditional_t<TMAQ, QMaps, NoMaps>>>;

__device__ __forceinline__ void mbar_init(uint32_t addr, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(addr), "r"(count) : "memory");
}
// A wait that never ends is a bug (a load that was never issued): trap after ~2^26 polls (seconds), so it
// shows as a launch failure instead of a hung GPU.
__device__ __forceinline__ void mbar_wait(uint32_t addr, uint32_t parity) {
  uint32_t done = 0;
  for (uint32_t polls = 0; !done; ++polls) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
    if (polls == (1u << 26)) __trap();
  }
}
// Generic-proxy shared writes (cp.async, stores) ordered before async-proxy accesses to them (wgmma's reads, bulk
// copies into the same bytes).
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r = 0;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
#endif
  return r;
}
// Every thread of both CTAs of the cluster; release/acquire, so what one CTA wrote before (its mbarrier
// initialization) is visible to the other after.
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}
// Makes this thread's mbarrier.init visible to the cluster (the other CTA's copies and arrives target them).
__device__ __forceinline__ void fence_mbarrier_init() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// One arrival on the mbarrier at the same shared offset in cluster CTA `rank` (this CTA's own included).
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t addr, uint32_t rank) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [remote];\n}\n" ::"r"(addr),
      "r"(rank)
      : "memory");
#endif
}
// This thread's arrival, announcing `bytes` more to land before the phase completes.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t addr, uint32_t bytes) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(addr), "r"(bytes) : "memory");
#endif
}
// A box of the 4-D `map` at (c0, c1, c2, c3) into this CTA's shared offset `dst`, its bytes signalled to the
// mbarrier at `bar`.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                            uint32_t bar) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
#endif
}
// A box of the 3-D `map` at (c0, c1, c2) into this CTA's shared offset `dst`, its bytes signalled to `bar`.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, uint32_t bar) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
#endif
}
// A box of `map` at (c0, c1, c2) into shared offset `dst` of every CTA in `mask`, each signalling its bytes
// to the mbarrier at offset `bar` of its own shared memory.
__device__ __forceinline__ void tma_load_3d_multicast(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2,
                                                      uint32_t bar, uint16_t mask) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%2, %3, %4}], [%5], %6;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar), "h"(mask)
      : "memory");
#endif
}

}  // namespace mla
