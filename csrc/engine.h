// The engine interface of yolozu_ttt._C: the fused step, grad statistics and SAR's ascent over a
// list of ArenaGroups, each writing its scalars into a caller's float64 `out` tensor (the same
// interface as the Triton engine, yolozu_ttt.kernels.update). bindings.cpp only binds these.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

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

// A step's options from a yolozu_ttt.engine.StepSpec (any object with its fields), read once;
// the spec has validated them.
StepOptions step_options(const pybind11::object& spec);

// One fused step of `options` over all groups at restore counter `restore_counter` (see
// engine.cpp); writes out[0:Stat::Count].
void fused_step(const pybind11::list& groups, const pybind11::object& out, const StepOptions& options,
                uint64_t restore_counter, const pybind11::object& gate);

// The grad norm and the anchor value, changing nothing; writes out[0:GradStat::Count].
void grad_stats(const pybind11::list& groups, const pybind11::object& out, double anchor_lambda,
                bool anchor_value);

// SAR's ascent step with the snapshot as backup (written whenever rho > 0); writes out[0:SarStat::Count].
void sar_perturb(const pybind11::list& groups, const pybind11::object& out, double rho, bool adaptive);

// The 32-bit key of the counter-based CoTTA restore RNG for one (seed, step counter, group).
uint32_t restore_key(uint64_t seed, uint64_t counter, uint64_t group);

// OpenMP: whether the module was built with it, and its thread count (1 without it).
bool openmp_enabled();
int num_threads();
void set_num_threads(int n);

}  // namespace yttt
