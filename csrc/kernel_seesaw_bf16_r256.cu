// Explicit instantiation: bf16, kv_lora_rank 256, rope 32.
#include "kernel_seesaw.cuh"

template cudaError_t launch_seesaw<MlaDtype::kBF16, 256, 32>(const MlaDecodeParams&, cudaStream_t, Launched*);
