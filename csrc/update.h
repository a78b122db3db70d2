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
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace yttt {

namespace py = pybind11;

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

// A view of a contiguous torch tensor that keeps the tensor alive.
struct Buffer {
  py::object ref;       // the tensor itself: holds the storage the pointer points into
  void* ptr = nullptr;
  int64_t numel = 0;
  DType dtype = DType::F32;
  bool defined() const { return ptr != nullptr; }
};

// What a buffer holds: parameter storage (float32, bfloat16 or float16; another dtype is a
// TypeError) or a call's float64 stats output (another dtype is a ValueError, like a wrong size).
enum class Holds { Storage, Stats };

// `tensor` (a contiguous CPU torch tensor; None when allow_none) as a Buffer; errors name it `what`.
Buffer make_buffer(const py::object& tensor, const char* what, bool allow_none,
                   Holds holds = Holds::Storage);

struct WorkItem {
  int64_t seg;
  int64_t begin;
  int64_t end;
};

// A per-element buffer of the arena given flat (one tensor of the arena's size) or as one
// contiguous tensor per segment: the base (the parameters' original storages), the moments,
// SAR's backup and the CoTTA teacher come per segment from the arena, small allocations the C
// library recycles instead of one fresh 39 MB mapping per run.
struct Segmented {
  std::vector<Buffer> refs;   // the tensors the pointers point into
  std::vector<char*> starts;  // where segment s starts (empty: unset)

  bool defined() const { return !starts.empty(); }

  // Element `w.begin` of work item `w` (segment offsets given).
  template <typename T>
  T* at(const WorkItem& w, const std::vector<int64_t>& offsets) const {
    return reinterpret_cast<T*>(starts[w.seg]) + (w.begin - offsets[w.seg]);
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

// What one call of the step makes of the CoTTA options (a closed gate turns both off): the
// teacher EMA on the updated parameters, then the stochastic restore to the base snapshot with
// a counter-based RNG keyed by `key`.
struct CottaStep {
  bool ema = false;
  double restore_prob = 0.0;
  uint32_t key = 0;
};

class ArenaGroup {
 public:
  ArenaGroup(py::object param, py::object grad, py::object exp_avg, py::object exp_avg_sq,
             py::object base, py::object snap, std::vector<int64_t> offsets,
             std::vector<int64_t> sizes, py::object has_grad);

  int64_t num_segments() const { return static_cast<int64_t>(offsets_.size()); }
  std::vector<int64_t> steps() const { return steps_; }
  void reset_state();

  // Passes (each parallel over work items, deterministic).
  StepStats grad_pass(double anchor_lambda, bool anchor_value = false) const;
  StepStats adam_pass(const StepOptions& options, float clip_coef, const CottaStep& cotta);
  // The CoTTA teacher's selected parameters (None unbinds): flat like param or one tensor per segment.
  void set_teacher(py::object teacher);
  // The base snapshot: one flat tensor like param, or one contiguous tensor per segment (e.g.
  // the parameters' original storages, so no copy of them is made).
  void set_base(py::object base);
  // The Adam moments (float32), flat or one tensor per segment; step counts back to 0.
  void set_moments(py::object exp_avg, py::object exp_avg_sq);
  // The pre-step snapshot (None unbinds): flat like param (possibly the grad buffer) or one
  // tensor per segment.
  void set_snapshot(py::object snap);
  double sar_direction_sumsq(bool adaptive) const;
  void sar_perturb(double scale, bool adaptive, bool apply);
  // A closed group reads as having no grad in any segment (a gated step that applies nothing).
  void set_closed(bool closed) { closed_ = closed; }

 private:
  const uint8_t* has_grad_ptr() const;
  // Runs body(tag, i, w, p, g) in parallel for every work item w = work_[i] of a segment with a
  // grad: tag is the param dtype's std::integral_constant, p and g point at w's first element.
  template <typename Body>
  void for_items_with_grad(Body&& body) const;

  // A flat buffer `b` matches param: its size, and float32 (`moments`) or the param dtype.
  void check_flat(const Buffer& b, const char* what, bool moments) const;
  // `obj` (a flat tensor like param, or a list of one contiguous tensor per segment) as a
  // Segmented buffer of float32 (`moments`) or of the param dtype; errors name it `what`.
  Segmented segmented(const py::object& obj, const char* what, bool moments) const;

  Buffer param_, grad_, has_grad_;
  Segmented base_, exp_avg_, exp_avg_sq_, snap_, teacher_;
  std::vector<int64_t> offsets_, sizes_, steps_;
  std::vector<WorkItem> work_;
  std::vector<uint8_t> no_grads_;  // one zero per segment: the flags of a closed group
  bool closed_ = false;
};

}  // namespace yttt
