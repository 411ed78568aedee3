// Explicit instantiation of the sm_90a seesaw path (kernel v7): fp16, kv_lora_rank 256, rope 32.
#include "mla_decode_seesaw.cuh"

template cudaError_t launch_mla_decode_seesaw<MlaDtype::kFP16, 256, 32>(const MlaDecodeParams&, cudaStream_t, bool*, bool*);
template bool mla_seesaw_built<MlaDtype::kFP16, 256, 32>();
