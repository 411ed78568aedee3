// Explicit instantiation of the sm_90a seesaw path (kernel v7): fp16, kv_lora_rank 512, rope 64.
#include "mla_decode_seesaw.cuh"

template cudaError_t launch_mla_decode_seesaw<MlaDtype::kFP16, 512, 64>(const MlaDecodeParams&, cudaStream_t);
template bool mla_seesaw_built<MlaDtype::kFP16, 512, 64>();
