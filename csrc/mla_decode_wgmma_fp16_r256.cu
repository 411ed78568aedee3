// Explicit instantiation of the sm_90a wgmma path: fp16, kv_lora_rank 256, rope 32.
#include "mla_decode_wgmma.cuh"

template cudaError_t launch_mla_decode_wgmma<MlaDtype::kFP16, 256, 32>(const MlaDecodeParams&, cudaStream_t);
template bool mla_wgmma_built<MlaDtype::kFP16, 256, 32>();
