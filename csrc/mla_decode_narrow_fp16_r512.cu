// Explicit instantiation of the sm_90a narrow kernel (v9): fp16, kv_lora_rank 512, rope 64.
#include "mla_decode_narrow.cuh"

template cudaError_t launch_mla_decode_narrow<MlaDtype::kFP16, 512, 64>(const MlaDecodeParams&, cudaStream_t, bool*);
