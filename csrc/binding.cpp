// torch binding of the absorbed MLA decode kernels: the only file under csrc/ that includes torch.
//   mla_patch::mla_decode        the op the product calls: checks, the dispatch's choice (dispatch.h), the launch;
//                                an optional row table reads a paged cache (continuous batching) in place.
//                                CUDA and Meta kernels, so it traces under torch.compile(fullgraph=True) and
//                                captures into CUDA graphs (no host syncs, no allocations outside torch's allocator).
//   mla_patch::_decode_forced    the same call with the choice made explicit (kernel, splits, TMA, a per-CTA
//                                timeline), reporting what ran: for tests, benchmarks and profiling
//                                (mla_patch/kernel_probe.py). Nothing is process-wide state.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "dispatch.h"
#include "kernels.h"
#include "params.h"

namespace {

// Error messages carry only strings: numbers go through std::to_string, shapes through dims_str. On the device
// image (torch 2.11+cu130) a check that streamed an integer into TORCH_CHECK's message segfaulted when it failed.
template <typename N>
std::string num(N v) {
  return std::to_string(v);
}

std::string dims_str(c10::IntArrayRef v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

const char* kernel_name(Kernel k) {
  return k == Kernel::kMma ? "mma" : k == Kernel::kSeesaw ? "seesaw" : "narrow";
}

// What the dispatch needs of a device, and whether it launches with programmatic dependent launch (cc >= 9.0),
// read once per device. (c10's headers, not ATen/cuda/CUDAContext.h, keep this file checkable without cuBLAS.)
struct DeviceInfo {
  DeviceCaps caps;
  bool pdl = false;
};

DeviceInfo device_info(int dev) {
  static DeviceInfo cache[64];
  static bool known[64] = {};
  if (dev >= 0 && dev < 64 && known[dev]) return cache[dev];
  int sms = 0, optin = 0, major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  DeviceInfo info;
  info.caps.num_sms = sms;
  info.caps.smem_optin = optin;
  info.caps.sm90a = major == 9 && minor == 0 && sm90a_kernels_built();  // the caller's guard made `dev` current
  info.pdl = major >= 9;
  if (dev >= 0 && dev < 64) {
    cache[dev] = info;
    known[dev] = true;
  }
  return info;
}

void check_tensor(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "mla_decode: ", name, " must have ", num(dim), " dims, got shape ", dims_str(t.sizes()));
  TORCH_CHECK(t.is_cuda(), "mla_decode: ", name, " must be a CUDA tensor, got ", t.device().str());
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) <= 1, "mla_decode: ", name,
              " must be contiguous in its last dim, got strides ", dims_str(t.strides()));
  // 16-byte copies: every row start must be 16-byte aligned.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "mla_decode: ", name,
              " must start at a 16-byte aligned address (storage offset ", num(t.storage_offset()), ")");
  for (int64_t d = 0; d < dim - 1; ++d) {
    TORCH_CHECK(t.stride(d) % 8 == 0 || t.size(d) == 1, "mla_decode: ", name, " stride of dim ", num(d),
                " must be a multiple of 8 elements (16 bytes), got strides ", dims_str(t.strides()));
  }
}

// Every check of the op's contract (mla_patch/reference.py); returns the shapes. With a row table (a paged cache)
// c_kv and k_pe are pools of rows [M, R] / [M, P] and row_index [B, T] names each sequence's rows.
DecodeShape check_decode_args(const at::Tensor& q_latent, const at::Tensor& q_pe, const at::Tensor& c_kv,
                              const at::Tensor& k_pe, const at::Tensor& kv_start, const at::Tensor& kv_end,
                              double sm_scale, const at::Tensor& row_index) {
  const bool paged = row_index.defined();
  check_tensor(q_latent, "q_latent", 4);
  check_tensor(q_pe, "q_pe", 4);
  check_tensor(c_kv, "c_kv", paged ? 2 : 3);
  check_tensor(k_pe, "k_pe", paged ? 2 : 3);
  const auto dtype = q_latent.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf,
              "mla_decode: q_latent must be bfloat16 or float16, got ", c10::toString(dtype));
  TORCH_CHECK(q_pe.scalar_type() == dtype && c_kv.scalar_type() == dtype && k_pe.scalar_type() == dtype,
              "mla_decode: q_latent, q_pe, c_kv and k_pe must share one dtype, got ", c10::toString(dtype), ", ",
              c10::toString(q_pe.scalar_type()), ", ", c10::toString(c_kv.scalar_type()), ", ",
              c10::toString(k_pe.scalar_type()));
  const int64_t B = q_latent.size(0), S = q_latent.size(1), H = q_latent.size(2), R = q_latent.size(3);
  const int64_t P = q_pe.size(3), T = paged ? row_index.size(-1) : c_kv.size(1);
  TORCH_CHECK(q_pe.size(0) == B && q_pe.size(1) == S && q_pe.size(2) == H, "mla_decode: q_pe ", dims_str(q_pe.sizes()),
              " does not match q_latent ", dims_str(q_latent.sizes()));
  if (paged) {
    TORCH_CHECK(row_index.is_cuda() && row_index.scalar_type() == at::kInt && row_index.dim() == 2 &&
                    row_index.size(0) == B && row_index.is_contiguous(),
                "mla_decode: row_index must be a contiguous int32 CUDA tensor [B=", num(B), ", T], got ",
                dims_str(row_index.sizes()));
    TORCH_CHECK(c_kv.size(1) == R && k_pe.size(0) == c_kv.size(0) && k_pe.size(1) == P && c_kv.size(0) < (1LL << 31),
                "mla_decode: with row_index, c_kv and k_pe must be pools [M, R=", num(R), "] and [M, P=", num(P),
                "], got ", dims_str(c_kv.sizes()), " and ", dims_str(k_pe.sizes()));
  } else {
    TORCH_CHECK(c_kv.size(0) == B && c_kv.size(2) == R, "mla_decode: c_kv must be [B=", num(B), ", T, R=", num(R),
                "], got ", dims_str(c_kv.sizes()));
    TORCH_CHECK(k_pe.size(0) == B && k_pe.size(1) == T && k_pe.size(2) == P, "mla_decode: k_pe must be [B=", num(B),
                ", T=", num(T), ", P=", num(P), "], got ", dims_str(k_pe.sizes()));
  }
  TORCH_CHECK((R == 512 && P == 64) || (R == 256 && P == 32),
              "mla_decode: (kv_lora_rank, rope) must be (512, 64) or (256, 32), got (", num(R), ", ", num(P), ")");
  for (const auto* t : {&kv_start, &kv_end}) {
    const char* name = t == &kv_start ? "kv_start" : "kv_end";
    TORCH_CHECK(t->is_cuda(), "mla_decode: ", name, " must be a CUDA tensor, got ", t->device().str());
    TORCH_CHECK(t->scalar_type() == at::kInt, "mla_decode: ", name, " must be int32, got ", c10::toString(t->scalar_type()));
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, "mla_decode: ", name, " must have shape [", num(B), "], got ",
                dims_str(t->sizes()));
    TORCH_CHECK(t->is_contiguous(), "mla_decode: ", name, " must be contiguous");
  }
  const auto device = q_latent.device();
  for (const auto* t : {&q_pe, &c_kv, &k_pe, &kv_start, &kv_end, &row_index}) {
    TORCH_CHECK(!t->defined() || t->device() == device, "mla_decode: all tensors must be on ", device.str(),
                ", got one on ", t->device());
  }
  TORCH_CHECK(S * H <= (1 << 20) && T < (1LL << 31) - 64 && B <= 65535,
              "mla_decode: sizes out of the kernel's range: B=", num(B), " S*H=", num(S * H), " T=", num(T));
  TORCH_CHECK(std::isfinite(sm_scale), "mla_decode: sm_scale must be finite, got ", num(sm_scale));
  return {B, S, H, R, P, T, paged};
}

template <int R, int P>
cudaError_t launch_as(Kernel kernel, bool bf16, const MlaDecodeParams& p, cudaStream_t stream, Launched* ran) {
  constexpr auto kBF16 = MlaDtype::kBF16, kFP16 = MlaDtype::kFP16;
  switch (kernel) {
    case Kernel::kMma:
      return bf16 ? launch_mma<kBF16, R, P>(p, stream, ran) : launch_mma<kFP16, R, P>(p, stream, ran);
    case Kernel::kSeesaw:
      return bf16 ? launch_seesaw<kBF16, R, P>(p, stream, ran) : launch_seesaw<kFP16, R, P>(p, stream, ran);
    case Kernel::kNarrow:
      if constexpr (R == 512) {
        return bf16 ? launch_narrow<kBF16, R, P>(p, stream, ran) : launch_narrow<kFP16, R, P>(p, stream, ran);
      }
      break;
  }
  return cudaErrorInvalidValue;  // narrow at R = 256: kernel_serves refused it
}

// The decode with `choice` made: outputs, the split workspace, the params, the launch. `tma` lets the sm_90a
// kernels load tiles by TMA; `timeline` (or undefined) takes the CTAs' stamps.
std::tuple<at::Tensor, at::Tensor, Launched> run_decode(const at::Tensor& q_latent, const at::Tensor& q_pe,
                                                        const at::Tensor& c_kv, const at::Tensor& k_pe,
                                                        const at::Tensor& kv_start, const at::Tensor& kv_end,
                                                        double sm_scale, const at::Tensor& row_index,
                                                        const DecodeShape& s, const DeviceInfo& info,
                                                        KernelChoice choice, bool tma, const at::Tensor& timeline) {
  auto out_latent = at::empty({s.B, s.S, s.H, s.R}, q_latent.options());
  auto lse = at::empty({s.B, s.S, s.H}, q_latent.options().dtype(at::kFloat));
  Launched ran{choice.kernel, false, false};
  if (s.B == 0 || s.S * s.H == 0) return {out_latent, lse, ran};
  if (s.T == 0 || (s.paged && c_kv.size(0) == 0)) {  // no cache row: every query sees nothing
    out_latent.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out_latent, lse, ran};
  }
  const size_t smem_needed = mma_smem_bytes(static_cast<int>(s.R), static_cast<int>(s.P), 32, kMlaMinStages);
  TORCH_CHECK(info.caps.smem_optin >= static_cast<int64_t>(smem_needed), "mla_decode: the kernel needs ",
              num(smem_needed), " bytes of shared memory per block, this GPU allows ", num(info.caps.smem_optin));

  at::Tensor o_partial, lse_partial;
  if (choice.splits > 1) {
    o_partial = at::empty({s.B, choice.splits, s.S * s.H, s.R}, q_latent.options());
    lse_partial = at::empty({s.B, choice.splits, s.S * s.H}, q_latent.options().dtype(at::kFloat));
  }
  MlaDecodeParams p{};
  p.q_latent = q_latent.data_ptr();
  p.q_pe = q_pe.data_ptr();
  p.c_kv = c_kv.data_ptr();
  p.k_pe = k_pe.data_ptr();
  p.kv_start = kv_start.data_ptr<int32_t>();
  p.kv_end = kv_end.data_ptr<int32_t>();
  p.out_latent = out_latent.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.o_partial = o_partial.defined() ? o_partial.data_ptr() : nullptr;
  p.lse_partial = lse_partial.defined() ? lse_partial.data_ptr<float>() : nullptr;
  p.q_latent_sb = q_latent.stride(0);
  p.q_latent_ss = q_latent.stride(1);
  p.q_latent_sh = q_latent.stride(2);
  p.q_pe_sb = q_pe.stride(0);
  p.q_pe_ss = q_pe.stride(1);
  p.q_pe_sh = q_pe.stride(2);
  if (s.paged) {  // pools of rows: no sequence stride, each row's place from the table
    p.row_index = row_index.data_ptr<int32_t>();
    p.pool_rows = static_cast<int>(c_kv.size(0));
    p.c_kv_st = c_kv.stride(0);
    p.k_pe_st = k_pe.stride(0);
  } else {
    p.c_kv_sb = c_kv.stride(0);
    p.c_kv_st = c_kv.stride(1);
    p.k_pe_sb = k_pe.stride(0);
    p.k_pe_st = k_pe.stride(1);
  }
  p.B = static_cast<int>(s.B);
  p.S = static_cast<int>(s.S);
  p.H = static_cast<int>(s.H);
  p.T = static_cast<int>(s.T);
  p.num_splits = choice.splits;
  p.sm_scale = static_cast<float>(sm_scale);
  p.pdl = info.pdl ? 1 : 0;
  p.tma = tma && info.caps.sm90a && !s.paged ? 1 : 0;
  if (timeline.defined()) {
    p.timeline = reinterpret_cast<unsigned long long*>(timeline.data_ptr<int64_t>());
    p.timeline_blocks = static_cast<int>(timeline.size(1));
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q_latent.device().index()).stream();
  const bool bf16 = q_latent.scalar_type() == at::kBFloat16;
  const cudaError_t err = s.R == 512 ? launch_as<512, 64>(choice.kernel, bf16, p, stream, &ran)
                                     : launch_as<256, 32>(choice.kernel, bf16, p, stream, &ran);
  TORCH_CHECK(err == cudaSuccess, "mla_decode: kernel launch failed: ", cudaGetErrorString(err));
  return {out_latent, lse, ran};
}

std::tuple<at::Tensor, at::Tensor> mla_decode_cuda(const at::Tensor& q_latent, const at::Tensor& q_pe,
                                                   const at::Tensor& c_kv, const at::Tensor& k_pe,
                                                   const at::Tensor& kv_start, const at::Tensor& kv_end,
                                                   double sm_scale, const std::optional<at::Tensor>& row_index) {
  const at::Tensor rows = row_index.has_value() ? *row_index : at::Tensor();
  const DecodeShape s = check_decode_args(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, sm_scale, rows);
  const c10::cuda::CUDAGuard guard(q_latent.device());
  const DeviceInfo info = device_info(q_latent.device().index());
  auto [out, lse, ran] = run_decode(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, sm_scale, rows, s, info,
                                    choose_kernel(info.caps, s), true, at::Tensor());
  return {out, lse};
}

// kernel: -1 the dispatch's choice, else a Kernel value; splits: 0 the dispatch's count for that kernel, else 1..128;
// tma: false keeps every tile on cp.async; timeline: int64 [2, blocks, 32] on the inputs' device, or None.
// Returns what ran: {kernel, splits, query tile by TMA, cache tiles by TMA}.
std::tuple<at::Tensor, at::Tensor, std::vector<int64_t>> decode_forced(
    const at::Tensor& q_latent, const at::Tensor& q_pe, const at::Tensor& c_kv, const at::Tensor& k_pe,
    const at::Tensor& kv_start, const at::Tensor& kv_end, double sm_scale, int64_t kernel, int64_t splits, bool tma,
    const std::optional<at::Tensor>& timeline, const std::optional<at::Tensor>& row_index) {
  const at::Tensor rows = row_index.has_value() ? *row_index : at::Tensor();
  const DecodeShape s = check_decode_args(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, sm_scale, rows);
  TORCH_CHECK(kernel >= -1 && kernel <= 2, "_decode_forced: kernel must be -1 (the dispatch's) or 0-2, got ",
              num(kernel));
  TORCH_CHECK(splits >= 0 && splits <= kMlaMaxSplits, "_decode_forced: splits must be 0 (the dispatch's) to ",
              num(kMlaMaxSplits), ", got ", num(splits));
  at::Tensor stamps;
  if (timeline.has_value() && timeline->defined()) {
    stamps = *timeline;
    TORCH_CHECK(stamps.device() == q_latent.device() && stamps.scalar_type() == at::kLong && stamps.is_contiguous() &&
                    stamps.dim() == 3 && stamps.size(0) == 2 && stamps.size(2) == 32 && stamps.size(1) > 0 &&
                    stamps.size(1) < (1LL << 31),
                "_decode_forced: timeline must be a contiguous int64 tensor [2, blocks, 32] on the inputs' device, got ",
                dims_str(stamps.sizes()));
  }
  const c10::cuda::CUDAGuard guard(q_latent.device());
  const DeviceInfo info = device_info(q_latent.device().index());
  KernelChoice choice = choose_kernel(info.caps, s);
  if (kernel >= 0) {
    choice.kernel = static_cast<Kernel>(kernel);
    TORCH_CHECK(kernel_serves(choice.kernel, info.caps, s), "_decode_forced: the ", kernel_name(choice.kernel),
                " kernel cannot serve this call (seesaw and narrow need compute capability 9.0 and a build with "
                "sm_90a; narrow needs R = 512, P = 64, S*H <= 16 and no row table)");
    choice.splits = num_splits_for(choice.kernel, s, info.caps.num_sms);
  }
  TORCH_CHECK(tma || choice.kernel != Kernel::kNarrow, "_decode_forced: the narrow kernel loads every tile by TMA");
  if (splits > 0) choice.splits = static_cast<int>(splits);
  auto [out, lse, ran] = run_decode(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, sm_scale, rows, s, info, choice, tma,
                                    stamps);
  return {out, lse, {static_cast<int64_t>(ran.kernel), choice.splits, ran.q_tma, ran.kv_tma}};
}

// Shapes only, for FakeTensor / torch.compile tracing.
std::tuple<at::Tensor, at::Tensor> mla_decode_meta(const at::Tensor& q_latent, const at::Tensor& q_pe,
                                                   const at::Tensor& c_kv, const at::Tensor& k_pe,
                                                   const at::Tensor& kv_start, const at::Tensor& kv_end,
                                                   double sm_scale, const std::optional<at::Tensor>& row_index) {
  TORCH_CHECK(q_latent.dim() == 4, "mla_decode: q_latent must be [B, S, H, R], got ", dims_str(q_latent.sizes()));
  auto out_latent = at::empty_symint(q_latent.sym_sizes(), q_latent.options());
  auto lse = at::empty_symint(q_latent.sym_sizes().slice(0, 3), q_latent.options().dtype(at::kFloat));
  return {out_latent, lse};
}

}  // namespace

TORCH_LIBRARY(mla_patch, m) {
  m.def(
      "mla_decode(Tensor q_latent, Tensor q_pe, Tensor c_kv, Tensor k_pe, Tensor kv_start, Tensor kv_end, "
      "float sm_scale, Tensor? row_index=None) -> (Tensor, Tensor)");
  m.def(
      "_decode_forced(Tensor q_latent, Tensor q_pe, Tensor c_kv, Tensor k_pe, Tensor kv_start, Tensor kv_end, "
      "float sm_scale, int kernel, int splits, bool tma, Tensor? timeline, Tensor? row_index=None) -> "
      "(Tensor, Tensor, int[])",
      &decode_forced);
}

TORCH_LIBRARY_IMPL(mla_patch, CUDA, m) { m.impl("mla_decode", &mla_decode_cuda); }

TORCH_LIBRARY_IMPL(mla_patch, Meta, m) { m.impl("mla_decode", &mla_decode_meta); }

// Importing mla_patch._C registers the ops above; the module itself exposes nothing.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
