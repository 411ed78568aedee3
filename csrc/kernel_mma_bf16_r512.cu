// Explicit instantiation: bf16, kv_lora_rank 512, rope 64.
#include "kernel_mma.cuh"

template cudaError_t launch_mma<MlaDtype::kBF16, 512, 64>(const MlaDecodeParams&, cudaStream_t, Launched*);
