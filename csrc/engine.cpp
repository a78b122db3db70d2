// The engine interface of yolozu_ttt._C over ArenaGroups: see engine.h.
#include "engine.h"

#include <pybind11/stl.h>  // the std::optional and std::pair casts of step_options

#include <cmath>
#include <string>
#include <vector>

#ifdef YTTT_OPENMP
#include <omp.h>
#endif

namespace yttt {

namespace {

std::vector<ArenaGroup*> as_groups(const py::list& groups) {
  std::vector<ArenaGroup*> out;
  out.reserve(groups.size());
  for (auto item : groups) out.push_back(item.cast<ArenaGroup*>());
  if (out.empty()) throw py::value_error("yolozu_ttt._C: groups must not be empty");
  return out;
}

// The caller's float64 `out` tensor, written through the index constants of engine.h. It is
// checked before the call changes anything, so a bad `out` leaves the arena as it was.
template <typename Key>
class StatsOut {
 public:
  StatsOut(const py::object& out, const char* fn) : buf_(make_buffer(out, "out", false, Holds::Stats)) {
    const int64_t count = static_cast<int64_t>(Key::Count);
    if (buf_.numel < count)
      throw py::value_error("yolozu_ttt._C: out has " + std::to_string(buf_.numel) + " elements, " + fn +
                            " writes " + std::to_string(count));
  }
  double& operator[](Key key) const { return static_cast<double*>(buf_.ptr)[static_cast<int>(key)]; }

 private:
  Buffer buf_;
};

// A norm from a fp64 sum of squares, overflowing to inf where the reference's fp32 sum would
// (a NaN sum stays NaN: the fp32 rounding and sqrt keep it).
double f32_norm(double sumsq) { return std::sqrt(static_cast<double>(static_cast<float>(sumsq))); }

// clip_grad_norm_'s coefficient, in fp32 like torch: min(max_norm / (||g|| + 1e-6), 1), NaN kept.
float clip_coefficient(double grad_sumsq, double max_grad_norm) {
  const float total = static_cast<float>(f32_norm(grad_sumsq));
  const float coef = static_cast<float>(max_grad_norm) / (total + static_cast<float>(kClipEps));
  return coef < 1.0f || std::isnan(coef) ? coef : 1.0f;
}

// A gate (None: open; else a 1-element float64 CPU tensor, read in place: nonzero = open).
bool gate_open(const py::object& gate) {
  if (gate.is_none()) return true;
  const Buffer b = make_buffer(gate, "gate", false, Holds::Stats);
  if (b.numel != 1) throw py::value_error("yolozu_ttt._C: gate must have one element");
  return *static_cast<const double*>(b.ptr) != 0.0;
}

// While alive, a closed gate makes every group's segments read as having no grad.
class GateClosed {
 public:
  GateClosed(const std::vector<ArenaGroup*>& gs, bool closed) : gs_(closed ? gs : std::vector<ArenaGroup*>{}) {
    for (auto* g : gs_) g->set_closed(true);
  }
  ~GateClosed() {
    for (auto* g : gs_) g->set_closed(false);
  }
  GateClosed(const GateClosed&) = delete;
  GateClosed& operator=(const GateClosed&) = delete;

 private:
  std::vector<ArenaGroup*> gs_;
};

}  // namespace

// Element j of group `group` restores when fmix32(j ^ key) >> 8 < prob * 2^24 (the Triton
// kernel uses the same key and hash).
uint32_t restore_key(uint64_t seed, uint64_t counter, uint64_t group) {
  uint32_t h = fmix32(static_cast<uint32_t>(seed) ^ kRestoreSeedMix);
  h = fmix32(h ^ static_cast<uint32_t>(seed >> 32));
  h = fmix32(h ^ static_cast<uint32_t>(counter) * kRestoreCounterMul);
  h = fmix32(h ^ static_cast<uint32_t>(counter >> 32));
  return fmix32(h ^ (static_cast<uint32_t>(group) + 1u) * kRestoreGroupMul);
}

// The fused step, numbered like the Triton engine and the README:
//   1 EATA anchor gradient, 2 grad norm ||g||, 3 clip coefficient, 4 Adam, 5 pre-step snapshot,
//   6 CoTTA teacher EMA, 7 CoTTA stochastic restore, 8 update / total-update norms (and the
//   restored count). Steps 1, 2 and 4-8 run per element in ArenaGroup::adam_pass (update.cpp).
StepOptions step_options(const py::object& spec) {
  StepOptions o;
  o.lr = spec.attr("lr").cast<double>();
  o.betas = spec.attr("betas").cast<std::pair<double, double>>();
  o.eps = spec.attr("eps").cast<double>();
  o.max_grad_norm = spec.attr("max_grad_norm").cast<std::optional<double>>();
  o.anchor_lambda = spec.attr("anchor_lambda").cast<double>();
  o.write_snapshot = spec.attr("write_snapshot").cast<bool>();
  o.ema_momentum = spec.attr("ema_momentum").cast<std::optional<double>>();
  o.restore_prob = spec.attr("restore_prob").cast<double>();
  o.restore_seed = spec.attr("restore_seed").cast<uint64_t>();
  return o;
}

void fused_step(const py::list& groups, const py::object& out, const StepOptions& options,
                uint64_t restore_counter, const py::object& gate) {
  const auto gs = as_groups(groups);
  const StatsOut<Stat> stats(out, "fused_step");
  const bool open = gate_open(gate);
  const GateClosed closed(gs, !open);  // a closed gate: no grads, no teacher EMA, no restore
  CottaStep cotta;
  cotta.ema = open && options.ema_momentum.has_value();
  cotta.restore_prob = open ? options.restore_prob : 0.0;
  StepStats total;
  float coef = 1.0f;
  {
    py::gil_scoped_release release;
    if (options.max_grad_norm) {
      // 1-2. ||g|| (anchor gradient included) over all groups first, then 3. the clip coefficient
      double gsq = 0.0;
      for (auto* g : gs) gsq += g->grad_pass(options.anchor_lambda).grad_sumsq;
      coef = clip_coefficient(gsq, *options.max_grad_norm);
    }
    for (size_t i = 0; i < gs.size(); ++i) {  // 1-8 per element; 7 keyed per group
      cotta.key = restore_key(options.restore_seed, restore_counter, i);
      total += gs[i]->adam_pass(options, coef, cotta);
    }
  }
  // 2, 8. the norms from the fp64 sums, non-finite where the reference's fp32 sums are
  stats[Stat::GradNorm] = f32_norm(total.grad_sumsq);
  stats[Stat::GradNormClipped] = f32_norm(total.clipped_grad_sumsq);
  stats[Stat::UpdateNorm] = f32_norm(total.update_sumsq);
  stats[Stat::TotalUpdateNorm] = f32_norm(total.total_sumsq);
  stats[Stat::AnchorLoss] = total.anchor;
  stats[Stat::ClipCoef] = static_cast<double>(coef);
  stats[Stat::Restored] = total.restored;
}

void grad_stats(const py::list& groups, const py::object& out, double anchor_lambda, bool anchor_value) {
  const auto gs = as_groups(groups);
  const StatsOut<GradStat> stats(out, "grad_stats");
  StepStats total;
  {
    py::gil_scoped_release release;
    for (auto* g : gs) total += g->grad_pass(anchor_lambda, anchor_value);
  }
  stats[GradStat::GradNorm] = f32_norm(total.grad_sumsq);
  stats[GradStat::AnchorLoss] = total.anchor;
}

// With rho > 0: the snapshot <- p (every segment, so it always holds the pre-ascent values), then
// p += rho/(||d||+1e-12) * d unless the norm is zero. A NaN norm applies (a NaN scale: the
// parameters with a grad become NaN), like the reference; nothing is decided on the host.
void sar_perturb(const py::list& groups, const py::object& out, double rho, bool adaptive) {
  const auto gs = as_groups(groups);
  const StatsOut<SarStat> stats(out, "sar_perturb");
  double norm = 0.0;
  bool applied = false;
  {
    py::gil_scoped_release release;
    double sumsq = 0.0;
    for (auto* g : gs) sumsq += g->sar_direction_sumsq(adaptive);
    norm = static_cast<double>(static_cast<float>(f32_norm(sumsq)));
    if (rho > 0.0) {
      applied = !(norm <= 0.0);
      const double scale = rho / (norm + kSarEps);
      for (auto* g : gs) g->sar_perturb(scale, adaptive, applied);
    }
  }
  stats[SarStat::DirectionNorm] = norm;
  stats[SarStat::Applied] = applied ? 1.0 : 0.0;
}

bool openmp_enabled() {
#ifdef YTTT_OPENMP
  return true;
#else
  return false;
#endif
}

int num_threads() {
#ifdef YTTT_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_num_threads(int n) {
  if (n < 1) throw py::value_error("yolozu_ttt._C: num_threads must be >= 1");
#ifdef YTTT_OPENMP
  omp_set_num_threads(n);
#endif
}

}  // namespace yttt
