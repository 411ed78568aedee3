// Explicit instantiation: fp16, kv_lora_rank 256, rope 32.
#include "mla_decode.cuh"

template cudaError_t launch_mla_decode<MlaDtype::kFP16, 256, 32>(const MlaDecodeParams&, cudaStream_t, bool*, bool*);
