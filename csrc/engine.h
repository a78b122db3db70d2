// The engine interface of yolozu_ttt._C: the fused step, grad statistics and SAR's ascent over a
// list of ArenaGroups, each writing its scalars into a caller's float64 `out` tensor (the same
// interface as the Triton engine, yolozu_ttt.kernels.update). Plain C++: bindings.cpp converts
// the Python arguments and binds these.
#pragma once

#include <cstdint>
#include <vector>

#include "update.h"

namespace yttt {

// Where each scalar goes in `out`. The order is that of yolozu_ttt/common.py's STAT_KEYS,
// GRAD_STAT_KEYS and SAR_STAT_KEYS (the names live there only); Count is the number of scalars,
// exported as _C.NUM_STATS, NUM_GRAD_STATS and NUM_SAR_STATS.
enum class Stat : int {  // STAT_KEYS: fused_step
  GradNorm,              // ||g|| before clipping (with the EATA anchor gradient)
  GradNormClipped,       // ||g|| after clipping
  UpdateNorm,            // ||p_new - p_old||
  TotalUpdateNorm,       // ||p_new - base||
  AnchorLoss,            // sum_i mean((p_i - base_i)^2) before the update
  ClipCoef,              // clip_grad_norm_'s coefficient (1 without clipping)
  Restored,              // elements put back to base by the CoTTA restore
  Count
};
enum class GradStat : int {  // GRAD_STAT_KEYS: grad_stats
  GradNorm,                  // ||g|| (with the EATA anchor gradient)
  AnchorLoss,                // the anchor value, or 0 when not asked for
  Count
};
enum class SarStat : int {  // SAR_STAT_KEYS: sar_perturb
  DirectionNorm,            // ||d||, d = g (adaptive: g*|p|)
  Applied,                  // 1.0 when the ascent was applied, else 0.0
  Count
};

// The groups of one call hold the same K rows (K = 1: one run); every call steps each row with its
// own sums and writes row r's scalars to out[r * Count : (r + 1) * Count] (`out`: a float64 buffer
// of at least K * Count). Each call checks its arguments before it changes anything, so bad input
// leaves the arena as it was.

// One fused step of `options` over all groups at restore counter `restore_counter` (see
// engine.cpp). gate: unset (every row open) or K float64 values read at the call (0: the row
// applies nothing). seeds: row r's restore seed (empty: options.restore_seed for every row).
void fused_step(const std::vector<ArenaGroup*>& groups, const Buffer& out, const StepOptions& options,
                uint64_t restore_counter, const Buffer& gate, const std::vector<uint64_t>& seeds = {});

// Each row's grad norm and anchor value, changing nothing.
void grad_stats(const std::vector<ArenaGroup*>& groups, const Buffer& out, double anchor_lambda,
                bool anchor_value);

// SAR's ascent step per row with the snapshot as backup (written whenever rho > 0).
void sar_perturb(const std::vector<ArenaGroup*>& groups, const Buffer& out, double rho, bool adaptive);

// The 32-bit key of the counter-based CoTTA restore RNG for one (seed, step counter, group).
uint32_t restore_key(uint64_t seed, uint64_t counter, uint64_t group);

// OpenMP: whether the module was built with it, and its thread count (1 without it).
bool openmp_enabled();
int num_threads();
void set_num_threads(int n);

}  // namespace yttt
