// The engine interface of yolozu_ttt._C over ArenaGroups: see engine.h.
#include "engine.h"

#include <cmath>
#include <string>
#include <vector>

#ifdef YTTT_OPENMP
#include <omp.h>
#endif

namespace yttt {

namespace {

// The groups' one row count K (the groups of one call hold the same K rows).
int64_t checked_rows(const std::vector<ArenaGroup*>& groups) {
  if (groups.empty()) throw ValueError("yolozu_ttt._C: groups must not be empty");
  for (auto* g : groups)
    if (g == nullptr) throw ValueError("yolozu_ttt._C: groups must not hold None");
  const int64_t rows = groups[0]->rows();
  for (auto* g : groups)
    if (g->rows() != rows) throw ValueError("yolozu_ttt._C: groups must hold the same number of rows");
  return rows;
}

// A float64 buffer of the caller (the stats `out`, the gate): the binding layer has checked it is
// a contiguous host array; here its dtype.
const Buffer& float64(const Buffer& b, const char* what) {
  if (b.dtype != DType::F64) throw ValueError(std::string("yolozu_ttt._C: ") + what + " must be float64");
  return b;
}

// The caller's float64 `out` buffer, (rows, Key::Count) row-major, written through the index
// constants of engine.h. It is checked before the call changes anything, so a bad `out` leaves
// the arena as it was.
template <typename Key>
class StatsOut {
 public:
  StatsOut(const Buffer& out, const char* fn, int64_t rows) : buf_(float64(out, "out")) {
    const int64_t count = static_cast<int64_t>(Key::Count) * rows;
    if (buf_.numel < count)
      throw ValueError("yolozu_ttt._C: out has " + std::to_string(buf_.numel) + " elements, " + fn +
                            " writes " + std::to_string(count));
  }
  double& operator()(int64_t row, Key key) const {
    return static_cast<double*>(buf_.ptr)[row * static_cast<int64_t>(Key::Count) + static_cast<int>(key)];
  }

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

// A gate (unset: every row open; else a float64 buffer of one element per row, read in place:
// nonzero = open) as the rows' open flags.
RowsOpen rows_open(const Buffer& gate, int64_t rows) {
  if (!gate.owner) return {};
  const Buffer& b = float64(gate, "gate");
  if (b.numel != rows)
    throw ValueError("yolozu_ttt._C: gate must have one element per row (" + std::to_string(rows) + "), got " +
                     std::to_string(b.numel));
  const double* v = static_cast<const double*>(b.ptr);
  RowsOpen open(rows);
  for (int64_t r = 0; r < rows; ++r) open[r] = v[r] != 0.0;
  return open;
}

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
void fused_step(const std::vector<ArenaGroup*>& groups, const Buffer& out, const StepOptions& options,
                uint64_t restore_counter, const Buffer& gate, const std::vector<uint64_t>& seeds) {
  const int64_t rows = checked_rows(groups);
  const StatsOut<Stat> stats(out, "fused_step", rows);
  const RowsOpen open = rows_open(gate, rows);  // a closed row: no grads, no teacher EMA, no restore
  if (!seeds.empty() && static_cast<int64_t>(seeds.size()) != rows)
    throw ValueError("yolozu_ttt._C: seeds must have one seed per row (" + std::to_string(rows) + "), got " +
                     std::to_string(seeds.size()));
  CottaStep cotta;
  cotta.ema = options.ema_momentum.has_value();
  cotta.restore_prob = options.restore_prob;
  cotta.keys.resize(rows);
  std::vector<float> coefs(rows, 1.0f);
  if (options.max_grad_norm) {
    // 1-2. each row's ||g|| (anchor gradient included) over all groups first, then 3. its clip coefficient
    std::vector<double> gsq(rows, 0.0);
    for (auto* g : groups) {
      const auto part = g->grad_pass(options.anchor_lambda, false, open);
      for (int64_t r = 0; r < rows; ++r) gsq[r] += part[r].grad_sumsq;
    }
    for (int64_t r = 0; r < rows; ++r) coefs[r] = clip_coefficient(gsq[r], *options.max_grad_norm);
  }
  std::vector<StepStats> total(rows);
  for (size_t i = 0; i < groups.size(); ++i) {  // 1-8 per element; 7 keyed per row and group
    for (int64_t r = 0; r < rows; ++r)
      cotta.keys[r] = restore_key(seeds.empty() ? options.restore_seed : seeds[r], restore_counter, i);
    const auto part = groups[i]->adam_pass(options, coefs, cotta, open);
    for (int64_t r = 0; r < rows; ++r) total[r] += part[r];
  }
  // 2, 8. the norms from the fp64 sums, non-finite where the reference's fp32 sums are
  for (int64_t r = 0; r < rows; ++r) {
    const StepStats& t = total[r];
    stats(r, Stat::GradNorm) = f32_norm(t.grad_sumsq);
    stats(r, Stat::GradNormClipped) = f32_norm(t.clipped_grad_sumsq);
    stats(r, Stat::UpdateNorm) = f32_norm(t.update_sumsq);
    stats(r, Stat::TotalUpdateNorm) = f32_norm(t.total_sumsq);
    stats(r, Stat::AnchorLoss) = t.anchor;
    stats(r, Stat::ClipCoef) = static_cast<double>(coefs[r]);
    stats(r, Stat::Restored) = t.restored;
  }
}

void grad_stats(const std::vector<ArenaGroup*>& groups, const Buffer& out, double anchor_lambda, bool anchor_value) {
  const int64_t rows = checked_rows(groups);
  const StatsOut<GradStat> stats(out, "grad_stats", rows);
  std::vector<StepStats> total(rows);
  for (auto* g : groups) {
    const auto part = g->grad_pass(anchor_lambda, anchor_value, {});
    for (int64_t r = 0; r < rows; ++r) total[r] += part[r];
  }
  for (int64_t r = 0; r < rows; ++r) {
    stats(r, GradStat::GradNorm) = f32_norm(total[r].grad_sumsq);
    stats(r, GradStat::AnchorLoss) = total[r].anchor;
  }
}

// Per row, with rho > 0: the snapshot <- p (every segment, so it always holds the pre-ascent
// values), then p += rho/(||d||+1e-12) * d unless the row's norm is zero. A NaN norm applies (a
// NaN scale: the row's parameters with a grad become NaN), like the reference; nothing is decided
// on the host.
void sar_perturb(const std::vector<ArenaGroup*>& groups, const Buffer& out, double rho, bool adaptive) {
  const int64_t rows = checked_rows(groups);
  const StatsOut<SarStat> stats(out, "sar_perturb", rows);
  std::vector<double> sumsq(rows, 0.0);
  for (auto* g : groups) {
    const auto part = g->sar_direction_sumsq(adaptive);
    for (int64_t r = 0; r < rows; ++r) sumsq[r] += part[r];
  }
  std::vector<double> norms(rows), scales(rows, 0.0);
  std::vector<uint8_t> applied(rows, 0);
  for (int64_t r = 0; r < rows; ++r) {
    norms[r] = static_cast<double>(static_cast<float>(f32_norm(sumsq[r])));
    if (rho > 0.0) {
      applied[r] = !(norms[r] <= 0.0);
      scales[r] = rho / (norms[r] + kSarEps);
    }
  }
  if (rho > 0.0)
    for (auto* g : groups) g->sar_perturb(scales, adaptive, applied);
  for (int64_t r = 0; r < rows; ++r) {
    stats(r, SarStat::DirectionNorm) = norms[r];
    stats(r, SarStat::Applied) = applied[r] ? 1.0 : 0.0;
  }
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
  if (n < 1) throw ValueError("yolozu_ttt._C: num_threads must be >= 1");
#ifdef YTTT_OPENMP
  omp_set_num_threads(n);
#endif
}

}  // namespace yttt
