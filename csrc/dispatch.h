// Which kernel serves a decode call, and with how many KV splits: one pure function of the device and the shapes
// (host-known only: T is the cache capacity; the lengths live on the GPU and are never read here).
//
// Rule table, rows = B * T (docs/KERNEL.md, "Dispatch", has the measurements behind each boundary):
//   device without the sm_90a kernels (not compute capability 9.0, or built without 90a)      -> mma
//   R = 512, P = 64, S*H <= 16 (H = 16 at one token)     narrow from 128K rows,               else mma
//   S*H < 64 (query rows mostly padding in seesaw's 64)  seesaw from 128K rows (R = 512),
//                                                                  256K rows (R = 256),       else mma
//   S*H >= 64                                            seesaw from 4K rows (R = 512, H % 64 == 0: its query
//                                                                  tile by TMA), 16K rows otherwise, else mma
// A paged cache (a row table) goes by cp.async: never narrow, and seesaw's 4K boundary (TMA query) is 16K there.
// Splits fill one wave of CTAs (one CTA per SM for every kernel) within what the capacity can feed.
#pragma once

#include <cstdint>

#include "kernels.h"

struct DeviceCaps {
  int num_sms = 0;
  int64_t smem_optin = 0;  // opt-in shared memory per block, bytes
  bool sm90a = false;      // compute capability 9.0 and a binary holding the sm_90a bodies
};

struct DecodeShape {
  int64_t B, S, H, R, P, T;
  bool paged = false;  // rows through a row table (params.row_index): cp.async only, so never narrow
};

struct KernelChoice {
  Kernel kernel;
  int splits;
};

constexpr int64_t kNarrowMinRows = 128 * 1024;
constexpr int64_t kSeesawMinRowsFewQueries512 = 128 * 1024;
constexpr int64_t kSeesawMinRowsFewQueries256 = 256 * 1024;
constexpr int64_t kSeesawMinRowsTmaQuery = 4096;
constexpr int64_t kSeesawMinRows = 16384;
constexpr int64_t kSeesawFullQueryRows = 64;  // S*H from which seesaw's 64-row query tile is all real rows

// mma: splits = floor(SMs / (B * m_tiles)), with at least two 32-row tiles of capacity a split unless that leaves
// fewer than 32 splits (then one tile a split, up to 32). The kernel cuts each sequence's actual range evenly, so a
// short sequence in a long buffer still gets balanced splits (the surplus ones are empty and exit at once).
inline int mma_num_splits(const DecodeShape& s, int num_sms) {
  const int64_t m_tile = mma_m_tile(static_cast<int>(s.S), static_cast<int>(s.H));
  const int64_t base = s.B * ((s.S * s.H + m_tile - 1) / m_tile);
  if (base <= 0 || s.T <= 0) return 1;
  int64_t splits = num_sms / base;
  const int64_t tiles = (s.T + kMlaNTile - 1) / kMlaNTile;
  const int64_t by_len = tiles / 2 > 32 ? tiles / 2 : (tiles < 32 ? tiles : 32);
  if (splits > by_len) splits = by_len;
  if (splits > kMlaMaxSplits) splits = kMlaMaxSplits;
  return splits < 1 ? 1 : static_cast<int>(splits);
}

// seesaw and narrow: each split gets at least one pair of 64-row tiles (128 rows) of capacity. The kernels cut a
// range into chunks of whole pairs, so n splits of T rows fill only ceil(T / per) of them (per = ceil(T / n) rounded
// up to a pair): the count is trimmed to those, so no CTA of a full-length sequence is empty.
inline int seesaw_num_splits(const DecodeShape& s, int num_sms) {
  constexpr int64_t kPair = 2 * kMlaSeesawNTile;
  const int64_t base = s.B * ((s.S * s.H + kMlaSeesawMTile - 1) / kMlaSeesawMTile);
  if (base <= 0 || s.T <= 0) return 1;
  int64_t splits = num_sms / base;
  const int64_t by_len = (s.T + kPair - 1) / kPair;
  if (splits > by_len) splits = by_len;
  if (splits > kMlaMaxSplits) splits = kMlaMaxSplits;
  if (splits <= 1) return 1;
  const int64_t per = ((s.T + splits - 1) / splits + kPair - 1) / kPair * kPair;
  return static_cast<int>((s.T + per - 1) / per);
}

inline int num_splits_for(Kernel kernel, const DecodeShape& s, int num_sms) {
  return kernel == Kernel::kMma ? mma_num_splits(s, num_sms) : seesaw_num_splits(s, num_sms);
}

// Whether `kernel` can run this call on this device at all (the private op refuses to force one that cannot).
inline bool kernel_serves(Kernel kernel, const DeviceCaps& caps, const DecodeShape& s) {
  const int r = static_cast<int>(s.R), p = static_cast<int>(s.P);
  switch (kernel) {
    case Kernel::kMma:
      return true;
    case Kernel::kSeesaw:
      return caps.sm90a && caps.smem_optin >= static_cast<int64_t>(seesaw_smem_bytes(r, p));
    case Kernel::kNarrow:
      return caps.sm90a && caps.smem_optin >= static_cast<int64_t>(narrow_smem_bytes(r, p)) &&
             narrow_serves(r, p, static_cast<int>(s.S), static_cast<int>(s.H)) && !s.paged;
  }
  return false;
}

inline Kernel choose_kernel_for(const DeviceCaps& caps, const DecodeShape& s) {
  if (!kernel_serves(Kernel::kSeesaw, caps, s)) return Kernel::kMma;
  const int64_t rows = s.B * s.T;
  if (kernel_serves(Kernel::kNarrow, caps, s)) return rows >= kNarrowMinRows ? Kernel::kNarrow : Kernel::kMma;
  int64_t min_rows;
  if (s.S * s.H < kSeesawFullQueryRows) {
    min_rows = s.R == 512 ? kSeesawMinRowsFewQueries512 : kSeesawMinRowsFewQueries256;
  } else {
    const bool tma_query = !s.paged && seesaw_tma_q_serves(static_cast<int>(s.R), static_cast<int>(s.H));
    min_rows = tma_query ? kSeesawMinRowsTmaQuery : kSeesawMinRows;
  }
  return rows >= min_rows ? Kernel::kSeesaw : Kernel::kMma;
}

inline KernelChoice choose_kernel(const DeviceCaps& caps, const DecodeShape& s) {
  const Kernel kernel = choose_kernel_for(caps, s);
  return {kernel, num_splits_for(kernel, s, caps.num_sms)};
}
