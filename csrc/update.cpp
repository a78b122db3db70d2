// Fused filtered parameter update on the CPU: see update.h.
#include "update.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#ifdef YTTT_OPENMP
#include <omp.h>
#endif

namespace yttt {

namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per work item (fixed: reductions stay deterministic)

// ---- scalar storage types -------------------------------------------------------------
inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t f32_to_f16(float f) {  // round to nearest even
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t absb = bits & 0x7fffffffu;
  if (absb > 0x7f800000u) return sign | 0x7e00u;            // NaN
  if (absb >= 0x477ff000u) return sign | 0x7c00u;           // overflow (>= 65520) -> inf
  if (absb < 0x38800000u) {                                 // subnormal or zero in fp16
    if (absb < 0x33000000u) return sign;                    // < 2^-25 rounds to zero
    const uint32_t exp = absb >> 23;
    const uint32_t mant = (absb & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;                       // 14..24
    uint32_t half = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half & 1u))) ++half;
    return sign | static_cast<uint16_t>(half);
  }
  uint32_t r = absb + 0xfffu + ((absb >> 13) & 1u);
  r -= (127 - 15) << 23;
  return sign | static_cast<uint16_t>(r >> 13);
}

template <DType D> struct Storage;
template <> struct Storage<DType::F32> {
  using T = float;
  using C = float;
  static C load(T v) { return v; }
  static T store(C v) { return v; }
};
template <> struct Storage<DType::BF16> {
  using T = uint16_t;
  using C = float;
  static C load(T v) { return bf16_to_f32(v); }
  static T store(C v) { return f32_to_bf16(v); }
};
template <> struct Storage<DType::F16> {
  using T = uint16_t;
  using C = float;
  static C load(T v) { return f16_to_f32(v); }
  static T store(C v) { return f32_to_f16(v); }
};

template <typename F>
auto dispatch(DType d, F&& f) {
  switch (d) {
    case DType::F32: return f(std::integral_constant<DType, DType::F32>{});
    case DType::BF16: return f(std::integral_constant<DType, DType::BF16>{});
    case DType::F16: return f(std::integral_constant<DType, DType::F16>{});
    case DType::F64: break;  // stats buffers only: no parameter storage
  }
  throw std::invalid_argument("yolozu_ttt._C: unsupported dtype");
}

// Below this many elements a pass runs on the calling thread: waking an OpenMP team costs more
// than the work (and much more on a loaded machine, where a descheduled thread stalls the barrier).
constexpr int64_t kParallelMinElements = 1 << 17;

template <typename Body>
void parallel_items(int64_t n, int64_t elements, Body&& body) {
#ifdef YTTT_OPENMP
#pragma omp parallel for schedule(static) if (elements >= kParallelMinElements)
#endif
  for (int64_t i = 0; i < n; ++i) body(i);
}

}  // namespace

ArenaGroup::ArenaGroup(Buffer param, Buffer grad, const Buffers& exp_avg, const Buffers& exp_avg_sq,
                       const Buffers& base, const std::optional<Buffers>& snap,
                       std::vector<int64_t> offsets, std::vector<int64_t> sizes, Buffer has_grad,
                       int64_t rows)
    : param_(std::move(param)), grad_(std::move(grad)), offsets_(std::move(offsets)), sizes_(std::move(sizes)),
      rows_(rows) {
  if (rows_ < 1) throw ValueError("yolozu_ttt._C: rows must be >= 1");
  const int64_t n = param_.numel;
  check_flat(grad_, "grad", false);
  if (offsets_.size() != sizes_.size())
    throw ValueError("yolozu_ttt._C: offsets and sizes differ in length");
  int64_t expect = 0;
  for (size_t s = 0; s < offsets_.size(); ++s) {
    if (offsets_[s] != expect || sizes_[s] < 0)
      throw ValueError("yolozu_ttt._C: segments must tile the arena in order");
    expect += sizes_[s];
    for (int64_t b = 0; b < sizes_[s]; b += kChunk)
      work_.push_back({static_cast<int64_t>(s), offsets_[s] + b,
                       offsets_[s] + std::min(sizes_[s], b + kChunk)});
  }
  if (expect * rows_ != n)
    throw ValueError("yolozu_ttt._C: segments cover " + std::to_string(expect) + " elements" +
                     (rows_ == 1 ? std::string() : " x " + std::to_string(rows_) + " rows") +
                     ", arena has " + std::to_string(n));
  row_numel_ = expect;
  if (has_grad.owner) {  // given (the binding layer sets the owner of every buffer it passes)
    if (has_grad.numel != static_cast<int64_t>(offsets_.size()))
      throw ValueError("yolozu_ttt._C: has_grad must be a byte buffer with one entry per segment");
    has_grad_ = std::move(has_grad);
  }
  steps_.assign(offsets_.size() * rows_, 0);
  set_base(base);
  set_moments(exp_avg, exp_avg_sq);
  set_snapshot(snap);
}

void ArenaGroup::check_flat(const Buffer& b, const char* what, bool moments) const {
  const std::string name = std::string("yolozu_ttt._C: ") + what;
  if (b.numel != param_.numel)
    throw ValueError(name + " has " + std::to_string(b.numel) + " elements, param has " +
                          std::to_string(param_.numel));
  if (b.dtype != (moments ? DType::F32 : param_.dtype))
    throw TypeError(name + (moments ? " must be float32" : " dtype differs from param"));
}

Segmented ArenaGroup::segmented(const Buffers& bufs, const char* what, bool moments) const {
  const DType dtype = moments ? DType::F32 : param_.dtype;
  const size_t n_seg = offsets_.size();
  const int64_t itemsize = dtype == DType::F32 ? 4 : 2;
  const std::string name = std::string("yolozu_ttt._C: ") + what;
  const char* dtype_name = moments ? "float32" : "the param dtype";
  Segmented out;
  out.starts.resize(n_seg);
  out.row_stride.resize(n_seg);
  if (bufs.per_segment) {  // segment s: rows x sizes[s] elements
    const std::vector<Buffer>& items = bufs.items;
    if (items.size() != n_seg)
      throw ValueError(name + " has " + std::to_string(items.size()) + " tensors, the arena has " +
                            std::to_string(n_seg) + " segments");
    for (size_t s = 0; s < n_seg; ++s) {
      const Buffer& b = items[s];
      if (b.numel != rows_ * sizes_[s] || b.dtype != dtype)
        throw ValueError(name + " segment " + std::to_string(s) + " must have " +
                              std::to_string(rows_ * sizes_[s]) + " elements of " + dtype_name);
      out.starts[s] = static_cast<char*>(b.ptr);
      out.row_stride[s] = sizes_[s];
      out.refs.push_back(b);
    }
    return out;
  }
  if (bufs.items.size() != 1) throw ValueError(name + " must be one buffer or one per segment");
  const Buffer& b = bufs.items[0];
  check_flat(b, what, moments);
  for (size_t s = 0; s < n_seg; ++s) {
    out.starts[s] = static_cast<char*>(b.ptr) + offsets_[s] * itemsize;
    out.row_stride[s] = row_numel_;
  }
  out.refs.push_back(b);
  return out;
}

void ArenaGroup::set_base(const Buffers& base) { base_ = segmented(base, "base", false); }

void ArenaGroup::set_moments(const Buffers& exp_avg, const Buffers& exp_avg_sq) {
  Segmented m1 = segmented(exp_avg, "exp_avg", true);
  Segmented m2 = segmented(exp_avg_sq, "exp_avg_sq", true);
  exp_avg_ = std::move(m1);
  exp_avg_sq_ = std::move(m2);
  reset_state();
}

void ArenaGroup::reset_state() {
  // A segment's first step never reads its moments, so zeroing the step counts is enough.
  std::fill(steps_.begin(), steps_.end(), 0);
}

// Sums of a tile are taken in fp32 (vectorised, `omp simd` reduction); tiles and work items are
// added in fp64 in a fixed order.
constexpr int64_t kTile = 256;

namespace {

struct Partials {
  double g = 0, c = 0, u = 0, t = 0, a = 0, r = 0;
};

// Steps 1-2 of the fused step (numbering: engine.cpp): 1. the EATA anchor gradient
// 2*lambda*(p - base)/numel added when ADD, 2. the grad norm's partial sum of squares; when VALUE,
// the anchor value's partial sum of (p - base)^2.
// p, g, b point at the work item's first element; n elements.
template <typename S, bool ADD, bool VALUE>
Partials grad_item(int64_t n, const typename S::T* p, const typename S::T* g,
                   const typename S::T* b, float ak) {
  Partials out;
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t t1 = std::min(t0 + kTile, n);
    float sg = 0.f, sa = 0.f;
#pragma omp simd reduction(+ : sg, sa)
    for (int64_t j = t0; j < t1; ++j) {
      float gv = S::load(g[j]);
      if (ADD || VALUE) {
        const float d = S::load(p[j]) - S::load(b[j]);
        if (ADD) gv += ak * d;
        if (VALUE) sa += d * d;
      }
      sg += gv * gv;
    }
    out.g += sg;
    out.a += sa;
  }
  return out;
}

struct AdamScalars {
  float w1, b2, w2, eps, clip, nss, bcs, ak;
  // CoTTA: teacher EMA (t <- t*m + (1-m)*p_new) and stochastic restore (p <- base with prob q)
  float ema_m, ema_w, restore_q;
  uint32_t key;
  bool first;  // the segment's first Adam step: step_item zeroes its moments before reading them
};

template <typename T>
struct Ptrs {
  T* p;
  const T* g;
  const T* b = nullptr;
  T* sn = nullptr;
  float* m1 = nullptr;
  float* m2 = nullptr;
  T* teacher = nullptr;
};

// Counter-based uniform in [0, 1): murmur3's fmix32 of (index ^ key); 24 random bits.
inline float uniform01(int64_t index, uint32_t key) {
  return static_cast<float>(fmix32(static_cast<uint32_t>(index) ^ key) >> (32 - kUniformBits)) *
         (1.0f / static_cast<float>(1u << kUniformBits));
}

// One step on a work item, steps 1, 2 and 4-8 of the fused step (numbering: engine.cpp; the
// step's clip coefficient, 3, comes in `k.clip`): Adam (torch.optim.Adam's operation order, fp32
// math) when the tensor has a grad (torch skips tensors without one), the pre-step snapshot, then
// the CoTTA extras, then the norms.
// Every per-element choice is a compile-time flag or a select, so the loop vectorises.
// `q` points at the work item's first element, `index0` is that element's index in the arena
// (the restore RNG's counter); n elements.
template <typename S, bool GRAD, bool ANCHOR, bool SNAP, bool EMA, bool RESTORE>
Partials step_item(int64_t index0, int64_t n, const Ptrs<typename S::T> q, const AdamScalars k) {
  Partials out;
  if (GRAD && k.first) {  // the segment's first step: moments start at 0 (their buffers may be unset)
    std::memset(q.m1, 0, sizeof(float) * n);
    std::memset(q.m2, 0, sizeof(float) * n);
  }
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t t1 = std::min(t0 + kTile, n);
    float sg = 0.f, sc = 0.f, su = 0.f, st = 0.f, sa = 0.f, sr = 0.f;
#pragma omp simd reduction(+ : sg, sc, su, st, sa, sr)
    for (int64_t j = t0; j < t1; ++j) {
      const auto praw = q.p[j];
      const float pold = S::load(praw);
      const float base = S::load(q.b[j]);
      float gv = 0.f;
      if (GRAD) gv = S::load(q.g[j]);
      // 5. pre-step snapshot, bit-exact; written after the grad is read: it may live in the grad buffer
      if (SNAP) q.sn[j] = praw;
      float pnew = pold;
      if (GRAD) {
        // 1. EATA anchor gradient: d/dp lambda*mean((p-base)^2) = 2*lambda*(p-base)/n
        if (ANCHOR) {
          const float d = pold - base;
          gv += k.ak * d;
          sa += d * d;
        }
        // 2. ||g||^2 (before clipping)
        sg += gv * gv;
        // 3. clip with the step's coefficient: g <- g * min(max_norm / (||g|| + 1e-6), 1)
        const float gc = gv * k.clip;
        sc += gc * gc;
        // 4. Adam: m <- m + (1-b1)(g-m) ; v <- v*b2 + ((1-b2)*g)*g
        const float m_prev = q.m1[j];
        const float v_prev = q.m2[j];
        const float mv = m_prev + k.w1 * (gc - m_prev);
        const float vv = v_prev * k.b2 + (k.w2 * gc) * gc;
        q.m1[j] = mv;
        q.m2[j] = vv;
        //    p <- p + ((-lr/bc1) * m) / (sqrt(v)/sqrt(bc2) + eps)
        const float denom = std::sqrt(vv) / k.bcs + k.eps;
        pnew = S::load(S::store(pold + (k.nss * mv) / denom));
      }
      // 6. CoTTA teacher EMA on the updated student: t <- t*m + (1-m)*p
      if (EMA) q.teacher[j] = S::store(S::load(q.teacher[j]) * k.ema_m + k.ema_w * pnew);
      // 7. CoTTA stochastic restore: p <- base where u(j) < q (and the restored count)
      if (RESTORE) {
        const bool back = uniform01(index0 + j, k.key) < k.restore_q;
        pnew = back ? base : pnew;
        sr += back ? 1.f : 0.f;
      }
      if (GRAD || RESTORE) q.p[j] = S::store(pnew);
      // 8. update / total-update norms: of the step and of the drift from the base snapshot
      const float du = pnew - pold;
      const float dt = pnew - base;
      su += du * du;
      st += dt * dt;
    }
    out.g += sg;
    out.c += sc;
    out.u += su;
    out.t += st;
    out.a += sa;
    out.r += sr;
  }
  return out;
}

template <typename F>
auto with_flag(bool flag, F&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

// Row r's stats from the partials of its work items (parts[r * items + i]), summed in item order:
// the order of a single row, whatever the number of rows.
std::vector<StepStats> reduce(const std::vector<Partials>& parts, const std::vector<WorkItem>& work,
                              const std::vector<int64_t>& sizes, int64_t rows) {
  std::vector<StepStats> out(rows);
  const size_t n_items = work.size();
  for (int64_t r = 0; r < rows; ++r) {
    StepStats& st = out[r];
    for (size_t i = 0; i < n_items; ++i) {
      const Partials& q = parts[r * n_items + i];
      st.grad_sumsq += q.g;
      st.clipped_grad_sumsq += q.c;
      st.update_sumsq += q.u;
      st.total_sumsq += q.t;
      st.anchor += q.a / static_cast<double>(sizes[work[i].seg]);
      st.restored += q.r;
    }
  }
  return out;
}

}  // namespace

template <typename Body>
void ArenaGroup::for_items_with_grad(const RowsOpen& open, Body&& body) const {
  const int64_t n_items = static_cast<int64_t>(work_.size());
  dispatch(param_.dtype, [&](auto tag) {
    using T = typename Storage<decltype(tag)::value>::T;
    const T* p = static_cast<const T*>(param_.ptr);
    const T* g = static_cast<const T*>(grad_.ptr);
    parallel_items(rows_ * n_items, param_.numel, [&](int64_t q) {
      const int64_t r = q / n_items;
      const WorkItem& w = work_[q - r * n_items];
      if (!stepping(open, r, w.seg)) return;
      const int64_t at = r * row_numel_ + w.begin;
      body(tag, r, q, w, p + at, g + at);
    });
  });
}

// 1. EATA anchor gradient and 2. ||g||^2 (and the anchor value) per row, without changing anything.
std::vector<StepStats> ArenaGroup::grad_pass(double anchor_lambda, bool anchor_value, const RowsOpen& open) const {
  std::vector<Partials> parts(work_.size() * rows_);
  for_items_with_grad(open, [&](auto tag, int64_t r, int64_t q, const WorkItem& w, const auto* p, const auto* g) {
    using S = Storage<decltype(tag)::value>;
    using T = typename S::T;
    const float ak = static_cast<float>(2.0 * anchor_lambda / static_cast<double>(sizes_[w.seg]));
    parts[q] = with_flag(anchor_lambda != 0.0, [&](auto A) {
      return with_flag(anchor_lambda != 0.0 || anchor_value, [&](auto V) {
        return grad_item<S, decltype(A)::value, decltype(V)::value>(w.end - w.begin, p, g,
                                                                     base_.at<const T>(w, offsets_, r), ak);
      });
    });
  });
  return reduce(parts, work_, sizes_, rows_);
}

// Steps 1, 2 and 4-8 of the fused step over the group (numbering: engine.cpp): one Adam step per
// row (torch.optim.Adam defaults and operation order, fp32 math), fused with the anchor gradient,
// clipping by the row's coefficient, the pre-step snapshot, the CoTTA extras and the update norms.
std::vector<StepStats> ArenaGroup::adam_pass(const StepOptions& options, const std::vector<float>& clip_coefs,
                                             const CottaStep& cotta, const RowsOpen& open) {
  const double lr = options.lr, beta1 = options.betas.first, beta2 = options.betas.second;
  const double eps = options.eps, anchor_lambda = options.anchor_lambda;
  const bool write_snapshot = options.write_snapshot;
  if (write_snapshot && !snap_.defined())
    throw ValueError("yolozu_ttt._C: write_snapshot needs a snapshot buffer");
  if (cotta.ema && !teacher_.defined())
    throw ValueError("yolozu_ttt._C: ema_momentum needs a teacher buffer (set_teacher)");
  const int64_t n_seg = num_segments();
  // Per (row, segment) bias corrections (torch computes them as Python floats, i.e. fp64); the
  // last step count's are reused (rows and segments mostly share their count).
  std::vector<float> neg_step_size(n_seg * rows_, 0.f), bc2_sqrt(n_seg * rows_, 1.f);
  std::vector<uint8_t> first(n_seg * rows_, 0);
  int64_t last = 0;
  float last_nss = 0.f, last_bcs = 1.f;
  for (int64_t r = 0; r < rows_; ++r) {
    for (int64_t s = 0; s < n_seg; ++s) {
      if (!stepping(open, r, s)) continue;
      const int64_t rs = r * n_seg + s;
      const int64_t step = ++steps_[rs];
      first[rs] = step == 1;
      if (step != last) {
        const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
        const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
        last = step;
        last_nss = static_cast<float>(-(lr / bc1));
        last_bcs = static_cast<float>(std::sqrt(bc2));
      }
      neg_step_size[rs] = last_nss;
      bc2_sqrt[rs] = last_bcs;
    }
  }
  const double m = std::min(1.0, std::max(0.0, options.ema_momentum.value_or(0.0)));
  const int64_t n_items = static_cast<int64_t>(work_.size());
  std::vector<Partials> parts(n_items * rows_);
  const bool anchor = anchor_lambda != 0.0;
  const bool restore = cotta.restore_prob > 0.0;
  dispatch(param_.dtype, [&](auto tag) {
    using S = Storage<decltype(tag)::value>;
    using T = typename S::T;
    T* const p = static_cast<T*>(param_.ptr);
    const T* const g = static_cast<const T*>(grad_.ptr);
    parallel_items(n_items * rows_, param_.numel, [&](int64_t q) {
      const int64_t r = q / n_items;
      const WorkItem& w = work_[q - r * n_items];
      const int64_t rs = r * n_seg + w.seg;
      const bool on = open.empty() || open[r];  // a closed row: no grads, no teacher EMA, no restore
      const AdamScalars k{static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                          static_cast<float>(1.0 - beta2), static_cast<float>(eps), clip_coefs[r],
                          neg_step_size[rs], bc2_sqrt[rs],
                          static_cast<float>(2.0 * anchor_lambda / static_cast<double>(sizes_[w.seg])),
                          static_cast<float>(m), static_cast<float>(1.0 - m),
                          static_cast<float>(cotta.restore_prob), cotta.keys[r], first[rs] != 0};
      const bool grad = stepping(open, r, w.seg);
      const bool ema = on && cotta.ema;
      const int64_t at = r * row_numel_ + w.begin;
      const Ptrs<T> ptrs{p + at,
                         g + at,
                         base_.at<const T>(w, offsets_, r),
                         write_snapshot ? snap_.at<T>(w, offsets_, r) : nullptr,
                         exp_avg_.at<float>(w, offsets_, r),
                         exp_avg_sq_.at<float>(w, offsets_, r),
                         ema ? teacher_.at<T>(w, offsets_, r) : nullptr};
      parts[q] = with_flag(grad, [&](auto G) {
        return with_flag(grad && anchor, [&](auto A) {
          return with_flag(write_snapshot, [&](auto N) {
            return with_flag(ema, [&](auto E) {
              return with_flag(on && restore, [&](auto R) {
                return step_item<S, decltype(G)::value, decltype(A)::value, decltype(N)::value,
                                 decltype(E)::value, decltype(R)::value>(w.begin, w.end - w.begin, ptrs, k);
              });
            });
          });
        });
      });
    });
  });
  return reduce(parts, work_, sizes_, rows_);
}

void ArenaGroup::set_snapshot(const std::optional<Buffers>& snap) {
  snap_ = snap ? segmented(*snap, "snap", false) : Segmented{};
}

void ArenaGroup::set_teacher(const std::optional<Buffers>& teacher) {
  teacher_ = teacher ? segmented(*teacher, "teacher", false) : Segmented{};
}

// SAR: each row's squared norm of the ascent direction g (adaptive: g*|p|) over tensors with a grad.
std::vector<double> ArenaGroup::sar_direction_sumsq(bool adaptive) const {
  std::vector<double> parts(work_.size() * rows_, 0.0);
  for_items_with_grad({}, [&](auto tag, int64_t, int64_t q, const WorkItem& w, const auto* p, const auto* g) {
    using S = Storage<decltype(tag)::value>;
    const int64_t n = w.end - w.begin;
    double total = 0.0;
    for (int64_t t0 = 0; t0 < n; t0 += kTile) {
      const int64_t t1 = std::min(t0 + kTile, n);
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = t0; j < t1; ++j) {
        float d = S::load(g[j]);
        if (adaptive) d *= std::fabs(S::load(p[j]));
        acc += d * d;
      }
      total += acc;
    }
    parts[q] = total;
  });
  std::vector<double> out(rows_, 0.0);
  const size_t n_items = work_.size();
  for (int64_t r = 0; r < rows_; ++r)
    for (size_t i = 0; i < n_items; ++i) out[r] += parts[r * n_items + i];
  return out;
}

// SAR: snapshot <- p (every row) ; p <- p + scales[r] * g (adaptive: g*|p|) over tensors with a
// grad, in the rows where apply[r].
void ArenaGroup::sar_perturb(const std::vector<double>& scales, bool adaptive, const std::vector<uint8_t>& apply) {
  if (!snap_.defined()) throw ValueError("yolozu_ttt._C: sar_perturb needs a snapshot buffer");
  if (snap_.starts[0] == grad_.ptr)
    throw ValueError("yolozu_ttt._C: sar_perturb needs a snapshot buffer apart from the grad buffer");
  const int64_t n_items = static_cast<int64_t>(work_.size());
  dispatch(param_.dtype, [&](auto tag) {
    using S = Storage<decltype(tag)::value>;
    using T = typename S::T;
    using C = typename S::C;
    T* const p0 = static_cast<T*>(param_.ptr);
    const T* const g0 = static_cast<const T*>(grad_.ptr);
    parallel_items(n_items * rows_, param_.numel, [&](int64_t q) {
      const int64_t r = q / n_items;
      const WorkItem w = work_[q - r * n_items];
      T* p = p0 + r * row_numel_;
      const T* g = g0 + r * row_numel_;
      std::memcpy(snap_.at<T>(w, offsets_, r), p + w.begin, sizeof(T) * (w.end - w.begin));
      if (!apply[r] || !stepping({}, r, w.seg)) return;
      const C sc = static_cast<C>(scales[r]);
      for (int64_t j = w.begin; j < w.end; ++j) {
        const C pv = S::load(p[j]);
        C d = S::load(g[j]);
        if (adaptive) d = d * std::abs(pv);
        p[j] = S::store(pv + sc * d);
      }
    });
  });
}

}  // namespace yttt
