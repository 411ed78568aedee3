// torch binding of the absorbed MLA decode kernel: the only file under csrc/ that includes torch.
// Order: check device, dtype, shapes, strides and alignment; device guard; current stream;
// allocate outputs (and the split-KV workspace, from the caching allocator); fill the params;
// dispatch on (dtype, R, P); check the launch. Registered as torch.ops.mla_patch.mla_decode with a
// CUDA kernel and a Meta kernel (shapes only), so it traces under torch.compile(fullgraph=True)
// and captures into CUDA graphs (no host syncs, no allocations outside the caching allocator).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "mla_params.h"

namespace {

// Error messages carry only strings: numbers go through std::to_string, shapes through dims_str.
// On the device image (torch 2.11+cu130) the first failing check that streamed an integer into
// TORCH_CHECK's message segfaulted (operator<< of a number; likely two libstdc++ copies), while
// checks streaming only strings raised cleanly.
template <typename N>
std::string num(N v) {
  return std::to_string(v);
}

std::string dims_str(c10::IntArrayRef v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

// Multiprocessor count and opt-in shared memory per block of a device, read once per device.
// (c10's headers, not ATen/cuda/CUDAContext.h, keep this file checkable without cuBLAS headers.)
struct DeviceInfo {
  int num_sms = 0;
  int smem_optin = 0;
  int cc_major = 0;
  int cc_minor = 0;
};

DeviceInfo device_info(int dev) {
  static DeviceInfo cache[64];
  if (dev >= 0 && dev < 64 && cache[dev].num_sms > 0) return cache[dev];
  DeviceInfo info;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.cc_minor, cudaDevAttrComputeCapabilityMinor, dev));
  if (dev >= 0 && dev < 64) cache[dev] = info;
  return info;
}

// ---- Which kernel serves a call: the portable mma.sync kernel (v4, every GPU) or, on compute capability 9.0
// when the binary holds its sm_90a body, the seesaw wgmma kernel (v7, csrc/mla_decode_seesaw.cuh).
// Mode: -1 default (below), 0 mma.sync everywhere, 1 v7 wherever it serves (any S*H), 2 the pair kernel (v8,
// experimental: v7's order with the two query tiles of a split as a 2-CTA cluster sharing each cache tile by TMA
// multicast) where it serves (mla_pair_serves), else v7; 3 the narrow kernel (v9: the heads as wgmma's N) where it
// serves (mla_narrow_serves: R = 512, S*H <= 16), else v7. The environment variable MLA_PATCH_WGMMA ("0" to "3")
// sets it, read once per process; the test-only op mla_patch::_wgmma_mode overrides both.
enum KernelPath : int { kPathMma = 0, kPathSeesaw = 1, kPathPair = 2, kPathNarrow = 3 };
// Default, from cached rows a call (B x cache capacity), measured on an H200 (docs/BENCHMARKS.md): with
// S*H >= 64 query rows v7 wins from 16K rows (92afede, H = 128: B = 1 at 16K 27.7 vs 35.9 us, B = 16 at 1K
// 27.9 vs 37.1 us; below, at B = 1 with 1K-4K, mma.sync: 12.4 vs 15.6 us, 18.4 vs 18.8 us), and from 4K rows where
// its query tile goes by TMA (session 7, H = 128, B = 1: 4K 13.5 vs 15.2 us; 1K 12.3 vs 11.0 us); with fewer
// (H = 16, padded to 64 rows; v7's late-QK_b order) from 256K rows (92afede: B = 16 at 16K 88.1 vs 92.2 us,
// B = 64 at 4K 92.9 vs 95.2 us; below, B = 128 at 1K 48.9 vs 49.1 is a tie and B = 64 at 1K 34.6 vs 30.6 us), and
// with R = 512 from 128K rows (session 9, after session 8's block-by-block tiles: B = 128 at 1K 46.5 vs 49.2 us,
// B = 64 at 1K 31.9 vs 31.1, B = 16 at 4K 31.9 vs 30.3). Where the narrow kernel serves (S*H <= 16, R = 512) it
// replaces v7 and starts at 128K rows (session 11, once mma.sync's query tile went by TMA, H = 16: B = 128 at 1K
// 45.9 vs 47.8 us (mma.sync), B = 64 at 4K 86.2 vs 95.6, B = 16 at 16K 85.4 vs 94.6; below, mma.sync is 2-4 % faster:
// B = 64 at 1K 29.9 vs 30.5, B = 16 at 4K 29.1 vs 29.8, B = 1 at 64K 30.1 vs 31.0; v7 is 1-6 % slower than v9 in
// every H = 16 cell with batch, session 10), unless its switch is off (narrow_enabled).
constexpr int64_t kNarrowMinRows = 128 * 1024;
constexpr int64_t kSeesawMinRowsWide = 16384;
constexpr int64_t kSeesawMinRowsWideTmaQ = 4096;
constexpr int64_t kSeesawMinRowsNarrow = 256 * 1024;
constexpr int64_t kSeesawMinRowsNarrow512 = 128 * 1024;
constexpr int64_t kSeesawWideQueryRows = 64;
std::atomic<int> g_wgmma_mode{-1};
std::atomic<int> g_last_path{-1};  // the kernel the last call launched (tests and the benchmark read it)

int wgmma_setting() {
  const int mode = g_wgmma_mode.load();
  if (mode >= 0) return mode;
  static const int env_mode = [] {
    const char* e = std::getenv("MLA_PATCH_WGMMA");
    if (e == nullptr || *e == '\0') return -1;
    return std::strcmp(e, "0") == 0 ? 0 : std::strcmp(e, "2") == 0 ? 2 : std::strcmp(e, "3") == 0 ? 3 : 1;
  }();
  return env_mode;
}

// The on/off switches below (v7's query and cache tiles by TMA, its balanced grid, the narrow kernel, PDL, fp32
// partials) share one shape: a test / benchmark hook mla_patch::_<name>(0|1|-1) sets the mode, and -1 (the default)
// leaves it to an environment variable, read once per process (the caller's static): on unless it is "0"
// (default_on), or off unless it is "1".
bool env_flag(const char* name, bool default_on) {
  const char* e = std::getenv(name);
  return default_on ? (e == nullptr || std::strcmp(e, "0") != 0) : (e != nullptr && std::strcmp(e, "1") == 0);
}
bool switch_on(const std::atomic<int>& hook, bool env_on) {
  const int mode = hook.load();
  return mode >= 0 ? mode == 1 : env_on;
}
// The hook's op: sets the mode, returns the previous one.
int64_t set_switch(std::atomic<int>& hook, int64_t mode, const char* usage) {
  TORCH_CHECK(mode >= -1 && mode <= 1, usage);
  return hook.exchange(static_cast<int>(mode));
}

// The query tile by TMA where it serves (v7: mla_seesaw_tma_q_serves; the mma.sync kernel on sm_90a:
// mla_decode_tma_q_serves): on by default; MLA_PATCH_TMA_Q=0 turns it off, the hook mla_patch::_tma_q(0|1|-1)
// overrides (the benchmark's A/B and the tests); _last_q_tma() says whether the last call's query tile went by TMA.
std::atomic<int> g_tma_q_mode{-1};
std::atomic<int> g_last_q_tma{0};
bool tma_q_enabled() {
  static const bool env_on = env_flag("MLA_PATCH_TMA_Q", true);
  return switch_on(g_tma_q_mode, env_on);
}
int64_t tma_q_op(int64_t mode) {
  return set_switch(g_tma_q_mode, mode, "mla_decode: _tma_q takes -1 (default), 0 (cp.async) or 1 (TMA)");
}
int64_t last_q_tma_op() { return g_last_q_tma.load(); }

// v7's cache tiles by TMA (TMAK in mla_decode_seesaw.cuh) where R = 512 and the grid is the regular one: on by
// default (H200, session 9, same-run A/Bs: H = 128 with batch 4-9 % faster than the cp.async tiles, batch 1 at 64K
// 5 %; H = 16 (the late order) 1-5 % faster once the maps stopped promoting L2 fills to 256 bytes, 1-4 % slower
// with that promotion); the mma.sync kernel's too where its query tile goes by TMA (session 11); MLA_PATCH_TMA_KV=0
// turns them off (read once per process), the hook
// mla_patch::_tma_kv(0|1|-1) overrides (the benchmark's A/B and the tests); _last_kv_tma() says whether the last
// call's tiles went by TMA.
std::atomic<int> g_tma_kv_mode{-1};
std::atomic<int> g_last_kv_tma{0};
bool tma_kv_enabled() {
  static const bool env_on = env_flag("MLA_PATCH_TMA_KV", true);
  return switch_on(g_tma_kv_mode, env_on);
}
int64_t tma_kv_op(int64_t mode) {
  return set_switch(g_tma_kv_mode, mode, "mla_decode: _tma_kv takes -1 (default), 0 (cp.async) or 1 (TMA)");
}
int64_t last_kv_tma_op() { return g_last_kv_tma.load(); }

// v7's balanced grid (mla_plan_start in mla_params.h), opt-in: MLA_PATCH_PLAN=1 runs it wherever it serves (read
// once per process), the hook mla_patch::_plan_mode(0|1|-1) overrides (the benchmark's A/B and the tests);
// _last_plan() says whether the last call ran it. Off by default: on an H200 (session 8, same-run A/B) it was
// slower in every cell, 4-68 % with batch at H = 128 (B = 64, 16K 542 vs 514 us; B = 128, 1K 112 vs 84 us): the ~3 %
// of SM time the regular grid leaves idle is less than what each extra item a CTA costs (the next item's query and
// first tiles load with nothing to hide under, its output), the merge, and its kernel's own 4-6 % (docs/KERNEL.md).
std::atomic<int> g_plan_mode{-1};
std::atomic<int> g_last_plan{0};
bool plan_enabled() {
  static const bool env_on = env_flag("MLA_PATCH_PLAN", false);
  return switch_on(g_plan_mode, env_on);
}
int64_t plan_mode_op(int64_t mode) {
  return set_switch(g_plan_mode, mode, "mla_decode: _plan_mode takes -1 (default: off), 0 (regular grid) or 1 (balanced)");
}
int64_t last_plan_op() { return g_last_plan.load(); }

// Whether the loaded binary has the sm_90a body of v7 (a build without 90a has trap stubs).
bool seesaw_built(int dev, bool bf16, int64_t R) {
  static int cache[64][4] = {};  // 0 unknown, 1 yes, 2 no
  const int k = (bf16 ? 0 : 2) + (R == 512 ? 0 : 1);
  if (dev >= 0 && dev < 64 && cache[dev][k] != 0) return cache[dev][k] == 1;
  bool ok;
  if (R == 512) {
    ok = bf16 ? mla_seesaw_built<MlaDtype::kBF16, 512, 64>() : mla_seesaw_built<MlaDtype::kFP16, 512, 64>();
  } else {
    ok = bf16 ? mla_seesaw_built<MlaDtype::kBF16, 256, 32>() : mla_seesaw_built<MlaDtype::kFP16, 256, 32>();
  }
  if (dev >= 0 && dev < 64) cache[dev][k] = ok ? 1 : 2;
  return ok;
}

// The sm_90a bodies can run here: a 9.0 device and a binary built with them (the same arch flags build every TU, so
// v7's check answers for v8 / v9 and mma.sync's TMA variants too).
bool sm90a_loaded(const DeviceInfo& info, int dev, bool bf16, int64_t R) {
  return info.cc_major == 9 && info.cc_minor == 0 && seesaw_built(dev, bf16, R);
}

// tma_q_on / narrow_on: the TMA-query and narrow-kernel switches (tma_q_enabled, narrow_enabled), read once a call
// by the caller.
int choose_path(const DeviceInfo& info, int dev, bool bf16, int64_t R, int64_t P, int64_t B, int64_t S, int64_t H,
                int64_t T, bool tma_q_on, bool narrow_on) {
  const int setting = wgmma_setting();
  if (setting == 0) return kPathMma;
  const int r32 = static_cast<int>(R), p32 = static_cast<int>(P);
  const bool narrow_serves = mla_narrow_serves(r32, p32, static_cast<int>(S), static_cast<int>(H)) &&
                             static_cast<size_t>(info.smem_optin) >= mla_narrow_smem_bytes(r32, p32);
  const bool narrow = narrow_serves && (setting == 3 || (setting == -1 && narrow_on));
  if (setting == -1) {
    const bool tma_q = tma_q_on && mla_seesaw_tma_q_serves(r32, static_cast<int>(H));
    const int64_t narrow_v7 = R == 512 ? kSeesawMinRowsNarrow512 : kSeesawMinRowsNarrow;  // v7's late order
    const int64_t min_rows = narrow                         ? kNarrowMinRows
                             : S * H < kSeesawWideQueryRows ? narrow_v7
                             : tma_q                        ? kSeesawMinRowsWideTmaQ
                                                            : kSeesawMinRowsWide;
    if (B * T < min_rows) return kPathMma;
  }
  if (static_cast<size_t>(info.smem_optin) < mla_seesaw_smem_bytes(r32, p32) || !sm90a_loaded(info, dev, bf16, R)) {
    return kPathMma;
  }
  const bool pair = setting == 2 && mla_pair_serves(r32, static_cast<int>(S), static_cast<int>(H));
  return pair ? kPathPair : narrow ? kPathNarrow : kPathSeesaw;
}

// The narrow kernel (v9) in the default dispatch where it serves: on by default; MLA_PATCH_NARROW=0 turns it off (v7
// or mma.sync by their thresholds there; read once per process), the hook mla_patch::_narrow_mode(0|1|-1) overrides
// (the benchmark's A/B and the tests). Mode 3 of _wgmma_mode runs it wherever it serves either way.
std::atomic<int> g_narrow_mode{-1};
bool narrow_enabled() {
  static const bool env_on = env_flag("MLA_PATCH_NARROW", true);
  return switch_on(g_narrow_mode, env_on);
}
int64_t narrow_mode_op(int64_t mode) {
  return set_switch(g_narrow_mode, mode, "mla_decode: _narrow_mode takes -1 (default), 0 (off) or 1 (on)");
}

// SMs the pair kernel can fill: two per 2-CTA cluster the device runs at once (cached per device and dtype), so
// its split count keeps the grid one wave; the SM count if the occupancy query fails (the launch then reports it).
int pair_sms(int dev, bool bf16, int num_sms) {
  static int cache[64][2] = {};
  int& slot = cache[dev >= 0 && dev < 64 ? dev : 0][bf16 ? 0 : 1];
  if (slot == 0) {
    const int clusters = bf16 ? mla_pair_max_clusters<MlaDtype::kBF16, 512, 64>() : mla_pair_max_clusters<MlaDtype::kFP16, 512, 64>();
    slot = clusters > 0 ? std::min(2 * clusters, num_sms) : num_sms;
  }
  return slot;
}

// Programmatic dependent launch of our kernels (compute capability >= 9.0): on by default; MLA_PATCH_PDL=0
// turns it off (read once per process), and the benchmark's hook mla_patch::_pdl_mode(0|1|-1) overrides.
std::atomic<int> g_pdl_mode{-1};
bool pdl_enabled(const DeviceInfo& info) {
  if (info.cc_major < 9) return false;
  static const bool env_on = env_flag("MLA_PATCH_PDL", true);
  return switch_on(g_pdl_mode, env_on);
}
int64_t pdl_mode_op(int64_t mode) {
  return set_switch(g_pdl_mode, mode, "mla_decode: _pdl_mode takes -1 (default), 0 (off) or 1 (on)");
}

// Split partials in fp32 instead of the input dtype (mla_decode.cuh, pack_out): off by default;
// MLA_PATCH_FP32_PARTIALS=1 turns it on (read once per process), the hook mla_patch::_fp32_partials(0|1|-1)
// overrides (the benchmark's A/B and the tests).
std::atomic<int> g_fp32_partials_mode{-1};
bool fp32_partials() {
  static const bool env_on = env_flag("MLA_PATCH_FP32_PARTIALS", false);
  return switch_on(g_fp32_partials_mode, env_on);
}
int64_t fp32_partials_op(int64_t mode) {
  return set_switch(g_fp32_partials_mode, mode,
                    "mla_decode: _fp32_partials takes -1 (default), 0 (input dtype) or 1 (fp32)");
}

// Split-KV factor forced by the benchmark's sweep (mla_patch::_force_splits(n), n > 0); 0 = the heuristic.
std::atomic<int> g_forced_splits{0};
int64_t force_splits_op(int64_t n) {
  TORCH_CHECK(n >= 0 && n <= kMlaMaxSplits, "mla_decode: _force_splits takes 0 (heuristic) to ",
              num(kMlaMaxSplits));
  return g_forced_splits.exchange(static_cast<int>(n));
}

// Per-CTA timeline buffer (mla_patch::_timeline(stamps), scripts/kernel_timeline.py): while one is set, each call
// on its device has its CTAs write their stamps into it (each call overwrites the last). Held here so it lives
// as long as the kernels that write it; the holder is never destroyed, so process exit needs no CUDA.
at::Tensor& timeline_buffer() {
  static auto* held = new at::Tensor();
  return *held;
}
void timeline_op(const std::optional<at::Tensor>& stamps) {
  if (!stamps.has_value() || !stamps->defined()) {
    timeline_buffer() = at::Tensor();
    return;
  }
  const at::Tensor& t = *stamps;
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kLong && t.is_contiguous() && t.dim() == 3 && t.size(0) == 2 &&
                  t.size(2) == 32 && t.size(1) > 0 && t.size(1) < (1LL << 31),
              "mla_decode: _timeline takes a contiguous int64 CUDA tensor [2, blocks, 32] or None, got ",
              dims_str(t.sizes()));
  timeline_buffer() = t;
}

int64_t wgmma_mode_op(int64_t mode) {
  TORCH_CHECK(mode >= -1 && mode <= 3,
              "mla_decode: _wgmma_mode takes -1 (default), 0 (mma.sync), 1 (v7), 2 (v8) or 3 (v9, narrow)");
  return g_wgmma_mode.exchange(static_cast<int>(mode));
}

int64_t last_path_op() { return g_last_path.load(); }

void check_tensor(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "mla_decode: ", name, " must have ", num(dim), " dims, got shape ", dims_str(t.sizes()));
  TORCH_CHECK(t.is_cuda(), "mla_decode: ", name, " must be a CUDA tensor, got ", t.device().str());
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) <= 1, "mla_decode: ", name,
              " must be contiguous in its last dim, got strides ", dims_str(t.strides()));
  // 16-byte cp.async: every row start must be 16-byte aligned.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "mla_decode: ", name,
              " must start at a 16-byte aligned address (storage offset ", num(t.storage_offset()), ")");
  for (int64_t d = 0; d < dim - 1; ++d) {
    TORCH_CHECK(t.stride(d) % 8 == 0 || t.size(d) == 1, "mla_decode: ", name, " stride of dim ", num(d),
                " must be a multiple of 8 elements (16 bytes), got strides ", dims_str(t.strides()));
  }
}

std::tuple<at::Tensor, at::Tensor> mla_decode_cuda(const at::Tensor& q_latent, const at::Tensor& q_pe,
                                                   const at::Tensor& c_kv, const at::Tensor& k_pe,
                                                   const at::Tensor& kv_start, const at::Tensor& kv_end,
                                                   double sm_scale) {
  check_tensor(q_latent, "q_latent", 4);
  check_tensor(q_pe, "q_pe", 4);
  check_tensor(c_kv, "c_kv", 3);
  check_tensor(k_pe, "k_pe", 3);
  const auto dtype = q_latent.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf,
              "mla_decode: q_latent must be bfloat16 or float16, got ", c10::toString(dtype));
  TORCH_CHECK(q_pe.scalar_type() == dtype && c_kv.scalar_type() == dtype && k_pe.scalar_type() == dtype,
              "mla_decode: q_latent, q_pe, c_kv and k_pe must share one dtype, got ", c10::toString(dtype), ", ",
              c10::toString(q_pe.scalar_type()), ", ", c10::toString(c_kv.scalar_type()), ", ",
              c10::toString(k_pe.scalar_type()));
  const int64_t B = q_latent.size(0), S = q_latent.size(1), H = q_latent.size(2), R = q_latent.size(3);
  const int64_t P = q_pe.size(3), T = c_kv.size(1);
  TORCH_CHECK(q_pe.size(0) == B && q_pe.size(1) == S && q_pe.size(2) == H, "mla_decode: q_pe ", dims_str(q_pe.sizes()),
              " does not match q_latent ", dims_str(q_latent.sizes()));
  TORCH_CHECK(c_kv.size(0) == B && c_kv.size(2) == R, "mla_decode: c_kv must be [B=", num(B), ", T, R=", num(R), "], got ",
              dims_str(c_kv.sizes()));
  TORCH_CHECK(k_pe.size(0) == B && k_pe.size(1) == T && k_pe.size(2) == P, "mla_decode: k_pe must be [B=", num(B),
              ", T=", num(T), ", P=", num(P), "], got ", dims_str(k_pe.sizes()));
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
  for (const auto* t : {&q_pe, &c_kv, &k_pe, &kv_start, &kv_end}) {
    TORCH_CHECK(t->device() == device, "mla_decode: all tensors must be on ", device.str(), ", got one on ",
                t->device());
  }
  TORCH_CHECK(S * H <= (1 << 20) && T < (1LL << 31) - 64 && B <= 65535,
              "mla_decode: sizes out of the kernel's range: B=", num(B), " S*H=", num(S * H), " T=", num(T));
  TORCH_CHECK(std::isfinite(sm_scale), "mla_decode: sm_scale must be finite, got ", num(sm_scale));

  const c10::cuda::CUDAGuard guard(device);
  auto out_latent = at::empty({B, S, H, R}, q_latent.options());
  auto lse = at::empty({B, S, H}, q_latent.options().dtype(at::kFloat));
  if (B == 0 || S * H == 0) return {out_latent, lse};
  if (T == 0) {
    out_latent.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out_latent, lse};
  }

  const DeviceInfo info = device_info(device.index());
  const int num_sms = info.num_sms;
  const size_t smem_needed = mla_decode_smem_bytes(static_cast<int>(R), static_cast<int>(P), 32, kMlaMinStages);
  TORCH_CHECK(static_cast<size_t>(info.smem_optin) >= smem_needed, "mla_decode: the kernel needs ", num(smem_needed),
              " bytes of shared memory per block, this GPU allows ", num(info.smem_optin));
  const bool bf16 = dtype == at::kBFloat16;
  const bool tma_q_on = tma_q_enabled();
  const int path = choose_path(info, device.index(), bf16, R, P, B, S, H, T, tma_q_on, narrow_enabled());
  const int b32 = static_cast<int>(B), s32 = static_cast<int>(S), h32 = static_cast<int>(H), t32 = static_cast<int>(T);
  const int forced = g_forced_splits.load();
  // v7 and v9 fill one wave of CTAs; v8 one of its 2-CTA clusters.
  const int split_sms = path == kPathPair ? pair_sms(device.index(), bf16, num_sms) : num_sms;
  const int num_splits = forced > 0          ? forced
                         : path == kPathMma ? mla_decode_num_splits(b32, s32, h32, t32, num_sms)
                                            : mla_seesaw_num_splits(b32, s32, h32, t32, split_sms);
  const bool partial_f32 = fp32_partials();
  // The balanced grid (opt-in): v7 only, not with a forced split count or the timeline (whose rows are the regular
  // grid's).
  const bool plan = path == kPathSeesaw && forced == 0 && !timeline_buffer().defined() && plan_enabled() &&
                    mla_plan_serves(b32, s32, h32, T) &&
                    static_cast<size_t>(info.smem_optin) >=
                        mla_seesaw_smem_bytes(static_cast<int>(R), static_cast<int>(P)) + kMlaPlanSmemBytes;
  at::Tensor o_partial, lse_partial, plan_offsets;
  auto f32 = q_latent.options().dtype(at::kFloat);
  // A lane of CTAs for each 64-row m-tile of the query rows (mla_plan_start).
  const int64_t plan_lanes = (S * H + kMlaSeesawMTile - 1) / kMlaSeesawMTile;
  const int plan_ctas = plan ? static_cast<int>(num_sms / plan_lanes * plan_lanes) : 0;
  if (plan) {  // two partial slots of 64 rows a CTA, and the pair offsets of every sequence
    o_partial = at::empty({2 * plan_ctas, kMlaSeesawMTile, R}, partial_f32 ? f32 : q_latent.options());
    lse_partial = at::empty({2 * plan_ctas, kMlaSeesawMTile}, f32);
    plan_offsets = at::empty({B + 1}, q_latent.options().dtype(at::kInt));
  } else if (num_splits > 1) {
    o_partial = at::empty({B, num_splits, S * H, R}, partial_f32 ? f32 : q_latent.options());
    lse_partial = at::empty({B, num_splits, S * H}, f32);
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
  p.plan_ctas = plan_ctas;
  p.plan_offsets = plan ? plan_offsets.data_ptr<int32_t>() : nullptr;
  p.q_latent_sb = q_latent.stride(0);
  p.q_latent_ss = q_latent.stride(1);
  p.q_latent_sh = q_latent.stride(2);
  p.q_pe_sb = q_pe.stride(0);
  p.q_pe_ss = q_pe.stride(1);
  p.q_pe_sh = q_pe.stride(2);
  p.c_kv_sb = c_kv.stride(0);
  p.c_kv_st = c_kv.stride(1);
  p.k_pe_sb = k_pe.stride(0);
  p.k_pe_st = k_pe.stride(1);
  p.B = static_cast<int>(B);
  p.S = static_cast<int>(S);
  p.H = static_cast<int>(H);
  p.T = static_cast<int>(T);
  p.num_splits = num_splits;
  p.sm_scale = static_cast<float>(sm_scale);
  p.pdl = pdl_enabled(info) ? 1 : 0;
  p.partial_f32 = partial_f32 ? 1 : 0;
  p.tma_q = tma_q_on && sm90a_loaded(info, device.index(), bf16, R) ? 1 : 0;  // v7's and mma.sync's TMAQ bodies
  p.tma_kv = tma_kv_enabled() ? 1 : 0;
  const at::Tensor& timeline = timeline_buffer();
  if (timeline.defined() && timeline.device() == device) {
    p.timeline = reinterpret_cast<unsigned long long*>(timeline.data_ptr<int64_t>());
    p.timeline_blocks = static_cast<int>(timeline.size(1));
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  cudaError_t err;
  g_last_path.store(path);
  bool q_tma = false, kv_tma = false;
  if (path == kPathPair) {  // R = 512 (mla_pair_serves); falls back to v7 where the tensor maps do not encode
    bool launched_pair = false;
    err = bf16 ? launch_mla_decode_pair<MlaDtype::kBF16, 512, 64>(p, stream, &launched_pair, &q_tma, &kv_tma)
               : launch_mla_decode_pair<MlaDtype::kFP16, 512, 64>(p, stream, &launched_pair, &q_tma, &kv_tma);
    if (!launched_pair) g_last_path.store(kPathSeesaw);
  } else if (path == kPathNarrow) {  // R = 512 (mla_narrow_serves); v7 where the tensor maps do not encode
    bool launched_narrow = false;
    err = bf16 ? launch_mla_decode_narrow<MlaDtype::kBF16, 512, 64>(p, stream, &launched_narrow)
               : launch_mla_decode_narrow<MlaDtype::kFP16, 512, 64>(p, stream, &launched_narrow);
    if (launched_narrow) {
      kv_tma = true;
    } else if (err == cudaSuccess) {
      g_last_path.store(kPathSeesaw);
      err = bf16 ? launch_mla_decode_seesaw<MlaDtype::kBF16, 512, 64>(p, stream, &q_tma, &kv_tma)
                 : launch_mla_decode_seesaw<MlaDtype::kFP16, 512, 64>(p, stream, &q_tma, &kv_tma);
    }
  } else if (path == kPathSeesaw) {
    if (R == 512) {
      err = bf16 ? launch_mla_decode_seesaw<MlaDtype::kBF16, 512, 64>(p, stream, &q_tma, &kv_tma)
                 : launch_mla_decode_seesaw<MlaDtype::kFP16, 512, 64>(p, stream, &q_tma, &kv_tma);
    } else {
      err = bf16 ? launch_mla_decode_seesaw<MlaDtype::kBF16, 256, 32>(p, stream, &q_tma, &kv_tma)
                 : launch_mla_decode_seesaw<MlaDtype::kFP16, 256, 32>(p, stream, &q_tma, &kv_tma);
    }
  } else if (R == 512) {
    err = bf16 ? launch_mla_decode<MlaDtype::kBF16, 512, 64>(p, stream, &q_tma, &kv_tma)
               : launch_mla_decode<MlaDtype::kFP16, 512, 64>(p, stream, &q_tma, &kv_tma);
  } else {
    err = bf16 ? launch_mla_decode<MlaDtype::kBF16, 256, 32>(p, stream, &q_tma, &kv_tma)
               : launch_mla_decode<MlaDtype::kFP16, 256, 32>(p, stream, &q_tma, &kv_tma);
  }
  g_last_q_tma.store(q_tma ? 1 : 0);
  g_last_kv_tma.store(kv_tma ? 1 : 0);
  g_last_plan.store(plan ? 1 : 0);
  TORCH_CHECK(err == cudaSuccess, "mla_decode: kernel launch failed: ", cudaGetErrorString(err));
  return {out_latent, lse};
}

// Shapes only, for FakeTensor / torch.compile tracing.
std::tuple<at::Tensor, at::Tensor> mla_decode_meta(const at::Tensor& q_latent, const at::Tensor& q_pe,
                                                   const at::Tensor& c_kv, const at::Tensor& k_pe,
                                                   const at::Tensor& kv_start, const at::Tensor& kv_end,
                                                   double sm_scale) {
  TORCH_CHECK(q_latent.dim() == 4, "mla_decode: q_latent must be [B, S, H, R], got ", dims_str(q_latent.sizes()));
  auto out_latent = at::empty_symint(q_latent.sym_sizes(), q_latent.options());
  auto lse = at::empty_symint(q_latent.sym_sizes().slice(0, 3), q_latent.options().dtype(at::kFloat));
  return {out_latent, lse};
}

}  // namespace

TORCH_LIBRARY(mla_patch, m) {
  m.def(
      "mla_decode(Tensor q_latent, Tensor q_pe, Tensor c_kv, Tensor k_pe, Tensor kv_start, Tensor kv_end, "
      "float sm_scale) -> (Tensor, Tensor)");
  // Test and benchmark hooks: the kernel mode (returns the previous one), the kernel of the last call,
  // programmatic dependent launch on/off, a forced split-KV factor, fp32 split partials on/off, v7's query tile
  // by TMA on/off and whether the last call's went by TMA, the same for its cache tiles, v7's balanced grid and
  // whether the last call ran it, the narrow kernel in the default dispatch on/off.
  m.def("_wgmma_mode(int mode) -> int", &wgmma_mode_op);
  m.def("_last_path() -> int", &last_path_op);
  m.def("_pdl_mode(int mode) -> int", &pdl_mode_op);
  m.def("_force_splits(int n) -> int", &force_splits_op);
  m.def("_fp32_partials(int mode) -> int", &fp32_partials_op);
  m.def("_tma_q(int mode) -> int", &tma_q_op);
  m.def("_last_q_tma() -> int", &last_q_tma_op);
  m.def("_tma_kv(int mode) -> int", &tma_kv_op);
  m.def("_last_kv_tma() -> int", &last_kv_tma_op);
  m.def("_plan_mode(int mode) -> int", &plan_mode_op);
  m.def("_narrow_mode(int mode) -> int", &narrow_mode_op);
  m.def("_last_plan() -> int", &last_plan_op);
  m.def("_timeline(Tensor? stamps) -> ()", &timeline_op);
}

TORCH_LIBRARY_IMPL(mla_patch, CUDA, m) { m.impl("mla_decode", &mla_decode_cuda); }

TORCH_LIBRARY_IMPL(mla_patch, Meta, m) { m.impl("mla_decode", &mla_decode_meta); }

// Importing mla_patch._C registers the op above; the module itself exposes nothing.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
