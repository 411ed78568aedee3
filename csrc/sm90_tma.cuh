// Asynchronous-copy plumbing of the sm_90a code: mbarriers, TMA (bulk tensor) loads, cp.async completing on an
// mbarrier, and named barriers. Used by the wgmma kernels and by the mma.sync kernel's TMA tiles. The expect-tx,
// fence and copy wrappers have empty bodies outside sm_90a (never reached there).
#pragma once
#include <cstdint>

#include <cuda.h>  // CUtensorMap (a plain 128-byte struct; nothing here links libcuda)

namespace mla {

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
// Makes this thread's mbarrier.init visible to the copy engine before bytes arrive on it.
__device__ __forceinline__ void fence_mbarrier_init() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
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
// The mbarrier's pending count drops by one when every earlier cp.async of this thread has landed.
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t addr) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(addr) : "memory");
}
__device__ __forceinline__ void named_bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
// Named barriers of the two-warpgroup kernels (0 is __syncthreads): A = seesaw's wg0 P_a and m_a are in their slots
// (wg0 arrives, wg1 waits), B = wg1's P_b and m_b (wg1 arrives, wg0 waits), WG0/WG1 = one warpgroup alone, END = the
// exchange after both loops, Q = the query tile landed, OUT = the normalized output staged in shared memory.
enum WarpgroupBarrier : int { kBarA = 1, kBarB = 2, kBarWg0 = 3, kBarWg1 = 4, kBarEnd = 5, kBarQ = 6, kBarOut = 7 };

}  // namespace mla
