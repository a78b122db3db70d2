// Fused, filtered in-place parameter update over a flat parameter arena (CPU).
//
// One ArenaGroup holds the flat buffers of the selected parameters of one dtype:
// params, grads, Adam moments (fp32), the base snapshot (flat, or one tensor per segment:
// the parameters' original storages) and the optional pre-step snapshot, plus the segment
// table (offset, numel) of the parameter tensors packed in it.
// The pre-step snapshot may be the grad buffer itself: the step reads each grad before it
// writes the snapshot over it (no 39 MB buffer to fault in per step).
// Every reduction is accumulated in fp64 per fixed-size chunk and the chunks are summed
// in a fixed order, so results do not depend on the number of OpenMP threads.
// Plain C++ throughout: bad input is a ValueError (std::invalid_argument) or a TypeError (below);
// bindings.cpp alone converts Python objects to these types and these errors to Python's.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace yttt {

// A wrong value (size, count, missing buffer): Python's ValueError.
using ValueError = std::invalid_argument;
// A wrong type (dtype): Python's TypeError (bindings.cpp translates it).
class TypeError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

// The constants shared with the Triton engine: the C++ copies of yolozu_ttt/kernels/constants.py
// (bindings.cpp exports them as _C.CONSTANTS; a test checks every pair equal).
constexpr double kClipEps = 1e-6;   // clip_grad_norm_'s: max_norm / (||g|| + eps)
constexpr double kSarEps = 1e-12;   // SAR's ascent scale: rho / (||d|| + eps)
constexpr uint32_t kFmix32M1 = 0x85ebca6bu;  // murmur3's fmix32 multipliers
constexpr uint32_t kFmix32M2 = 0xc2b2ae35u;
constexpr uint32_t kRestoreSeedMix = 0x9e3779b9u;  // the restore key's mixing constants
constexpr uint32_t kRestoreCounterMul = 0x632be5abu;
constexpr uint32_t kRestoreGroupMul = 0x85157af5u;
constexpr int kUniformBits = 24;  // the restore draw's random bits
static_assert(static_cast<float>(kClipEps) == 1e-6f, "the fp32 clip epsilon is torch's");

// murmur3's 32-bit finaliser: the mixing function of the counter-based restore RNG.
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= kFmix32M1;
  h ^= h >> 13;
  h *= kFmix32M2;
  h ^= h >> 16;
  return h;
}

enum class DType : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

// A contiguous array in host memory and what keeps it alive (the binding layer's owner: e.g. the
// tensor whose storage `ptr` points into).
struct Buffer {
  std::shared_ptr<void> owner;
  void* ptr = nullptr;
  int64_t numel = 0;
  DType dtype = DType::F32;
  bool defined() const { return ptr != nullptr; }
};

// A per-element state of the arena as given: one flat buffer of the arena's size, or one buffer
// per segment (`per_segment`).
struct Buffers {
  std::vector<Buffer> items;
  bool per_segment = false;
};

struct WorkItem {
  int64_t seg;
  int64_t begin;
  int64_t end;
};

// A per-element buffer of the arena given flat (one tensor of the arena's size) or as one
// contiguous tensor per segment: the base (the parameters' original storages), the moments,
// SAR's backup and the CoTTA teacher come per segment from the arena, small allocations the C
// library recycles instead of one fresh 39 MB mapping per run.
// With K rows, a flat buffer holds row r at r * (the row's elements), a segment's buffer holds its
// row r at r * (the segment's elements): `row_stride` says which, per segment.
struct Segmented {
  std::vector<Buffer> refs;         // the tensors the pointers point into
  std::vector<char*> starts;        // where segment s of row 0 starts (empty: unset)
  std::vector<int64_t> row_stride;  // elements from one row of segment s to the next

  bool defined() const { return !starts.empty(); }

  // Element `w.begin` of work item `w` in row `row` (segment offsets given).
  template <typename T>
  T* at(const WorkItem& w, const std::vector<int64_t>& offsets, int64_t row) const {
    return reinterpret_cast<T*>(starts[w.seg]) + (row * row_stride[w.seg] + w.begin - offsets[w.seg]);
  }
};

struct StepStats {
  double grad_sumsq = 0.0;          // sum of squares of the (anchor-augmented) grads, before clipping
  double clipped_grad_sumsq = 0.0;  // the same after clipping
  double update_sumsq = 0.0;        // ||p_new - p_old||^2
  double total_sumsq = 0.0;         // ||p_new - base||^2
  double anchor = 0.0;              // sum_i mean((p_i - base_i)^2) before the update
  double restored = 0.0;            // elements reset to base by the CoTTA stochastic restore

  StepStats& operator+=(const StepStats& o) {
    grad_sumsq += o.grad_sumsq;
    clipped_grad_sumsq += o.clipped_grad_sumsq;
    update_sumsq += o.update_sumsq;
    total_sumsq += o.total_sumsq;
    anchor += o.anchor;
    restored += o.restored;
    return *this;
  }
};

// A fused step's options, the fields of yolozu_ttt.engine.StepSpec (bound read-only as
// _C.StepOptions, built once per run from the spec, which has validated them: nothing here
// checks a value).
struct StepOptions {
  double lr = 0.0;
  std::pair<double, double> betas{0.9, 0.999};
  double eps = 1e-8;
  std::optional<double> max_grad_norm;  // clip like clip_grad_norm_ (none: no clipping)
  double anchor_lambda = 0.0;           // EATA anchor weight
  bool write_snapshot = true;           // snap <- p (pre-step values) in the same pass
  std::optional<double> ema_momentum;   // CoTTA teacher EMA (none: no EMA), clamped to [0, 1]
  double restore_prob = 0.0;            // CoTTA stochastic restore to base
  uint64_t restore_seed = 0;            // the key of the counter-based restore RNG
};

// What one call of the step makes of the CoTTA options (a closed row turns both off for it): the
// teacher EMA on the updated parameters, then the stochastic restore to the base snapshot with
// a counter-based RNG keyed per row by `keys[row]`.
struct CottaStep {
  bool ema = false;
  double restore_prob = 0.0;
  std::vector<uint32_t> keys;  // one per row
};

// Which rows a pass steps: open[r] != 0 (empty: every row). A closed row reads as having no grad
// in any segment (a gated step that applies nothing to it).
using RowsOpen = std::vector<uint8_t>;

// K rows (replicas) of one arena group: every per-element state holds K rows of the segments
// (flat: K x the row's elements, row-major; per segment: K x the segment's elements), the
// has-grad flags are shared, the Adam step counts are per row and segment. Each pass steps every
// row, each with its own sums (returned per row, reduced in the order a single row is: K = 1 is
// the same path), parallel over (row, work item) pairs.
class ArenaGroup {
 public:
  // has_grad: one byte per segment (unset: every segment has a grad); snap: unset = none.
  ArenaGroup(Buffer param, Buffer grad, const Buffers& exp_avg, const Buffers& exp_avg_sq,
             const Buffers& base, const std::optional<Buffers>& snap, std::vector<int64_t> offsets,
             std::vector<int64_t> sizes, Buffer has_grad, int64_t rows = 1);

  int64_t num_segments() const { return static_cast<int64_t>(offsets_.size()); }
  int64_t rows() const { return rows_; }
  // Adam step counts, row-major (rows x segments).
  std::vector<int64_t> steps() const { return steps_; }
  void reset_state();

  // Passes (each parallel over (row, work item), deterministic); the stats per row.
  std::vector<StepStats> grad_pass(double anchor_lambda, bool anchor_value, const RowsOpen& open) const;
  // clip_coefs: one per row.
  std::vector<StepStats> adam_pass(const StepOptions& options, const std::vector<float>& clip_coefs,
                                   const CottaStep& cotta, const RowsOpen& open);
  // The CoTTA teacher's selected parameters (unset unbinds): flat like param or one per segment.
  void set_teacher(const std::optional<Buffers>& teacher);
  // The base snapshot: one flat tensor like param, or one contiguous tensor per segment (e.g.
  // the parameters' original storages, so no copy of them is made).
  void set_base(const Buffers& base);
  // The Adam moments (float32), flat or one tensor per segment; step counts back to 0.
  void set_moments(const Buffers& exp_avg, const Buffers& exp_avg_sq);
  // The pre-step snapshot (unset unbinds): flat like param (possibly the grad buffer) or one
  // tensor per segment.
  void set_snapshot(const std::optional<Buffers>& snap);
  // SAR: each row's squared ascent-direction norm; then its ascent by scales[r] where apply[r].
  std::vector<double> sar_direction_sumsq(bool adaptive) const;
  void sar_perturb(const std::vector<double>& scales, bool adaptive, const std::vector<uint8_t>& apply);

 private:
  // Whether segment `seg` of row `row` steps (has a grad, its row open).
  bool stepping(const RowsOpen& open, int64_t row, int64_t seg) const {
    const uint8_t* hg = static_cast<const uint8_t*>(has_grad_.ptr);
    return (open.empty() || open[row]) && (hg == nullptr || hg[seg]);
  }
  // Runs body(tag, r, q, w, p, g) in parallel for every (row r, work item w = work_[i]), q = r *
  // items + i, where the segment steps: tag is the param dtype's std::integral_constant, p and g
  // point at w's first element in row r.
  template <typename Body>
  void for_items_with_grad(const RowsOpen& open, Body&& body) const;

  // A flat buffer `b` matches param: its size, and float32 (`moments`) or the param dtype.
  void check_flat(const Buffer& b, const char* what, bool moments) const;
  // `bufs` (flat like param, or one buffer per segment) as a Segmented buffer of float32
  // (`moments`) or of the param dtype; errors name it `what`.
  Segmented segmented(const Buffers& bufs, const char* what, bool moments) const;

  Buffer param_, grad_, has_grad_;
  Segmented base_, exp_avg_, exp_avg_sq_, snap_, teacher_;
  std::vector<int64_t> offsets_, sizes_, steps_;
  std::vector<WorkItem> work_;
  int64_t rows_ = 1, row_numel_ = 0;
};

}  // namespace yttt
