// Explicit instantiation: bf16, kv_lora_rank 512, rope 64.
#include "kernel_seesaw.cuh"

template cudaError_t launch_seesaw<MlaDtype::kBF16, 512, 64>(const MlaDecodeParams&, cudaStream_t, Launched*);

// The sm_90a bodies exist only in an sm_90a cubin (the same arch flags build every file); a build without them has
// the trap stubs. Asked of the current device's cubin, once per device.
bool sm90a_kernels_built() {
  static int known[64] = {};  // 0 unknown, 1 yes, 2 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (dev >= 0 && dev < 64 && known[dev] != 0) return known[dev] == 1;
  cudaFuncAttributes attr{};
  bool built = cudaFuncGetAttributes(&attr, mla::seesaw_kernel<MlaDtype::kBF16, 512, 64, false, false, false>) == cudaSuccess;
  if (!built) cudaGetLastError();
  built = built && attr.binaryVersion == 90 && attr.numRegs >= 64;
  if (dev >= 0 && dev < 64) known[dev] = built ? 1 : 2;
  return built;
}
