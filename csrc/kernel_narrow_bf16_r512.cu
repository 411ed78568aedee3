// Explicit instantiation: bf16, kv_lora_rank 512, rope 64.
#include "kernel_narrow.cuh"

template cudaError_t launch_narrow<MlaDtype::kBF16, 512, 64>(const MlaDecodeParams&, cudaStream_t, Launched*);
