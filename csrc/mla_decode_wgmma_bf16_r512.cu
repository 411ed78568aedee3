// Explicit instantiation of the sm_90a wgmma path: bf16, kv_lora_rank 512, rope 64.
#include "mla_decode_wgmma.cuh"

template cudaError_t launch_mla_decode_wgmma<MlaDtype::kBF16, 512, 64>(const MlaDecodeParams&, cudaStream_t);
template bool mla_wgmma_built<MlaDtype::kBF16, 512, 64>();

#ifdef MLA_PATCH_DIAG  // timing diagnostics (scripts/bench_wgmma_diag.py); never in a release build
template cudaError_t launch_mla_decode_wgmma<MlaDtype::kBF16, 512, 64, 1>(const MlaDecodeParams&, cudaStream_t);
template cudaError_t launch_mla_decode_wgmma<MlaDtype::kBF16, 512, 64, 2>(const MlaDecodeParams&, cudaStream_t);
template cudaError_t launch_mla_decode_wgmma<MlaDtype::kBF16, 512, 64, 3>(const MlaDecodeParams&, cudaStream_t);
template cudaError_t launch_mla_decode_wgmma<MlaDtype::kBF16, 512, 64, 4>(const MlaDecodeParams&, cudaStream_t);
template cudaError_t launch_mla_decode_wgmma<MlaDtype::kBF16, 512, 64, 6>(const MlaDecodeParams&, cudaStream_t);
#endif
