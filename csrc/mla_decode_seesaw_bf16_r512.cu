// Explicit instantiation of the sm_90a seesaw path (kernel v7) and its pair kernel (v8): bf16, kv_lora_rank 512, rope 64.
#include "mla_decode_seesaw.cuh"

template cudaError_t launch_mla_decode_seesaw<MlaDtype::kBF16, 512, 64>(const MlaDecodeParams&, cudaStream_t, bool*, bool*);
template bool mla_seesaw_built<MlaDtype::kBF16, 512, 64>();
template cudaError_t launch_mla_decode_pair<MlaDtype::kBF16, 512, 64>(const MlaDecodeParams&, cudaStream_t, bool*, bool*, bool*);
template int mla_pair_max_clusters<MlaDtype::kBF16, 512, 64>();
