// Explicit instantiation: fp16, kv_lora_rank 256, rope 32.
#include "kernel_mma.cuh"

template cudaError_t launch_mma<MlaDtype::kFP16, 256, 32>(const MlaDecodeParams&, cudaStream_t, Launched*);
