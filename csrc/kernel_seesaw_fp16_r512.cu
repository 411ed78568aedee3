// Explicit instantiation: fp16, kv_lora_rank 512, rope 64.
#include "kernel_seesaw.cuh"

template cudaError_t launch_seesaw<MlaDtype::kFP16, 512, 64>(const MlaDecodeParams&, cudaStream_t, Launched*);
