// Explicit instantiation: fp16, kv_lora_rank 512, rope 64.
#include "mla_decode.cuh"

template cudaError_t launch_mla_decode<MlaDtype::kFP16, 512, 64>(const MlaDecodeParams&, cudaStream_t, bool*, bool*);
