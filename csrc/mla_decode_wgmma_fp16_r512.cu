// Explicit instantiation of the sm_90a wgmma path: fp16, kv_lora_rank 512, rope 64.
#include "mla_decode_wgmma.cuh"

template cudaError_t launch_mla_decode_wgmma<MlaDtype::kFP16, 512, 64>(const MlaDecodeParams&, cudaStream_t);
template bool mla_wgmma_built<MlaDtype::kFP16, 512, 64>();
