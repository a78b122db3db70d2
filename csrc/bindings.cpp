// pybind11 module yolozu_ttt._C: the fused CPU update engine.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <limits>

#include "update.h"

#ifdef YTTT_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
namespace yttt {
void register_cpu_ops(py::module_& m);  // csrc/ops_cpu.cpp
}
using yttt::ArenaGroup;
using yttt::StepStats;

namespace {

std::vector<ArenaGroup*> as_groups(const py::list& groups) {
  std::vector<ArenaGroup*> out;
  out.reserve(groups.size());
  for (auto item : groups) out.push_back(item.cast<ArenaGroup*>());
  if (out.empty()) throw py::value_error("yolozu_ttt._C: groups must not be empty");
  return out;
}

// A norm from a fp64 sum of squares, overflowing to inf where the reference's fp32 sum would.
double f32_norm(double sumsq) { return std::sqrt(static_cast<double>(static_cast<float>(sumsq))); }

// clip_grad_norm_'s coefficient, in fp32 like torch: min(max_norm / (||g|| + 1e-6), 1).
float clip_coefficient(double grad_sumsq, double max_grad_norm) {
  const float total = static_cast<float>(f32_norm(grad_sumsq));
  const float coef = static_cast<float>(max_grad_norm) / (total + 1e-6f);
  return coef < 1.0f || std::isnan(coef) ? coef : 1.0f;
}

// The CoTTA restore key of one (seed, step counter, group): element j of the group restores
// when fmix32(j ^ key) >> 8 < prob * 2^24 (the Triton kernel uses the same key and hash).
uint32_t restore_key(uint64_t seed, uint64_t counter, uint64_t group) {
  uint32_t h = yttt::fmix32(static_cast<uint32_t>(seed) ^ 0x9e3779b9u);
  h = yttt::fmix32(h ^ static_cast<uint32_t>(seed >> 32));
  h = yttt::fmix32(h ^ static_cast<uint32_t>(counter) * 0x632be5abu);
  h = yttt::fmix32(h ^ static_cast<uint32_t>(counter >> 32));
  return yttt::fmix32(h ^ (static_cast<uint32_t>(group) + 1u) * 0x85157af5u);
}

py::dict fused_step(const py::list& groups, double lr, double beta1, double beta2, double eps,
                    py::object max_grad_norm, double anchor_lambda, bool write_snapshot,
                    py::object ema_momentum, double restore_prob, uint64_t restore_seed,
                    uint64_t restore_counter) {
  if (!(restore_prob >= 0.0)) throw py::value_error("yolozu_ttt._C: restore_prob must be >= 0");
  if (!(lr >= 0.0)) throw py::value_error("yolozu_ttt._C: lr must be >= 0");
  if (!(beta1 >= 0.0 && beta1 < 1.0) || !(beta2 >= 0.0 && beta2 < 1.0))
    throw py::value_error("yolozu_ttt._C: betas must lie in [0, 1)");
  const auto gs = as_groups(groups);
  const bool clip = !max_grad_norm.is_none();
  const double max_norm = clip ? max_grad_norm.cast<double>() : 0.0;
  const double ema_momentum_value = ema_momentum.is_none() ? 0.0 : ema_momentum.cast<double>();
  StepStats total;
  float coef = 1.0f;
  {
    py::gil_scoped_release release;
    if (clip) {
      double gsq = 0.0;
      for (auto* g : gs) gsq += g->grad_pass(anchor_lambda).grad_sumsq;
      coef = clip_coefficient(gsq, max_norm);
    }
    for (size_t i = 0; i < gs.size(); ++i) {
      auto* g = gs[i];
      yttt::CottaStep cotta;
      cotta.ema = !ema_momentum.is_none();
      cotta.ema_momentum = cotta.ema ? ema_momentum_value : 0.0;
      cotta.restore_prob = restore_prob;
      cotta.key = restore_key(restore_seed, restore_counter, i);
      const StepStats s = g->adam_pass(lr, beta1, beta2, eps, coef, anchor_lambda, write_snapshot, cotta);
      total.grad_sumsq += s.grad_sumsq;
      total.clipped_grad_sumsq += s.clipped_grad_sumsq;
      total.update_sumsq += s.update_sumsq;
      total.total_sumsq += s.total_sumsq;
      total.anchor += s.anchor;
      total.restored += s.restored;
    }
  }
  py::dict out;
  out["grad_norm"] = f32_norm(total.grad_sumsq);
  out["grad_norm_clipped"] = f32_norm(total.clipped_grad_sumsq);
  out["update_norm"] = f32_norm(total.update_sumsq);
  out["total_update_norm"] = f32_norm(total.total_sumsq);
  out["anchor_loss"] = total.anchor;
  out["clip_coef"] = static_cast<double>(coef);
  out["restored"] = total.restored;
  return out;
}

py::tuple grad_stats(const py::list& groups, double anchor_lambda, bool anchor_value) {
  const auto gs = as_groups(groups);
  StepStats total;
  {
    py::gil_scoped_release release;
    for (auto* g : gs) {
      const StepStats s = g->grad_pass(anchor_lambda, anchor_value);
      total.grad_sumsq += s.grad_sumsq;
      total.anchor += s.anchor;
    }
  }
  return py::make_tuple(f32_norm(total.grad_sumsq), total.anchor);
}

// SAR ascent: returns (direction norm, applied): p += rho/(||d||+1e-12) * d with the snapshot
// written first, unless the norm is zero (then nothing changes, like the reference).
py::tuple sar_perturb(const py::list& groups, double rho, bool adaptive) {
  const auto gs = as_groups(groups);
  double norm = 0.0;
  bool applied = false;
  {
    py::gil_scoped_release release;
    double sumsq = 0.0;
    for (auto* g : gs) sumsq += g->sar_direction_sumsq(adaptive);
    norm = static_cast<double>(static_cast<float>(f32_norm(sumsq)));
    if (rho > 0.0 && norm > 0.0) {
      const double scale = rho / (norm + 1e-12);
      for (auto* g : gs) g->sar_perturb(scale, adaptive);
      applied = true;
    }
  }
  return py::make_tuple(norm, applied);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "yolozu_ttt fused CPU update engine (flat parameter arena, OpenMP)";

  py::class_<ArenaGroup>(m, "ArenaGroup")
      .def(py::init<py::object, py::object, py::object, py::object, py::object, py::object,
                    std::vector<int64_t>, std::vector<int64_t>, py::object>(),
           py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
           py::arg("base"), py::arg("snap"), py::arg("offsets"), py::arg("sizes"),
           py::arg("has_grad") = py::none(),
           "Bind the buffers of one (device, dtype) arena (base, exp_avg and exp_avg_sq flat or "
           "one tensor per segment). The group keeps every tensor alive; segments (offsets, "
           "sizes) must tile the arena in order.")
      .def_property_readonly("numel", &ArenaGroup::numel)
      .def_property_readonly("num_segments", &ArenaGroup::num_segments)
      .def_property_readonly("steps", &ArenaGroup::steps)
      .def("reset_state", &ArenaGroup::reset_state,
           "Fresh Adam state: step counts to 0 (a segment's first step starts its moments at 0).")
      .def("set_teacher", &ArenaGroup::set_teacher, py::arg("teacher"),
           "Bind (or with None, unbind) the CoTTA teacher buffer: flat like param, or a list "
           "with one tensor per segment.")
      .def("set_base", &ArenaGroup::set_base, py::arg("base"),
           "Bind the base snapshot (the anchor of the total-update norm, EATA and the CoTTA "
           "restore): a flat tensor like param, or a list with one contiguous tensor per segment.")
      .def("set_moments", &ArenaGroup::set_moments, py::arg("exp_avg"), py::arg("exp_avg_sq"),
           "Bind the float32 Adam moments (flat, or a list with one tensor per segment) and reset "
           "the step counts; a segment's first step zeroes its moments before reading them.")
      .def("set_snapshot", &ArenaGroup::set_snapshot, py::arg("snap"),
           "Bind (or with None, unbind) the pre-step snapshot buffer: flat like param, or a list "
           "with one tensor per segment. It may be the grad buffer (the step reads each grad "
           "before writing the snapshot over it), except for sar_perturb, whose backup must "
           "outlive the next backward.");

  m.def("fused_step", &fused_step, py::arg("groups"), py::arg("lr"), py::arg("beta1") = 0.9,
        py::arg("beta2") = 0.999, py::arg("eps") = 1e-8, py::arg("max_grad_norm") = py::none(),
        py::arg("anchor_lambda") = 0.0, py::arg("write_snapshot") = true,
        py::arg("ema_momentum") = py::none(), py::arg("restore_prob") = 0.0,
        py::arg("restore_seed") = 0, py::arg("restore_counter") = 0,
        "One fused step over all groups: grad norm, clip, Adam (torch defaults), snapshot, "
        "update and total-update norms; with ema_momentum, the teacher EMA on the updated "
        "params, and with restore_prob > 0 the CoTTA stochastic restore to base (counter-based "
        "RNG keyed by restore_seed and restore_counter). Returns a dict of Python floats.");
  m.def("restore_key", &restore_key, py::arg("seed"), py::arg("counter"), py::arg("group"),
        "The 32-bit key of the counter-based restore RNG for one group and step.");
  m.def("grad_stats", &grad_stats, py::arg("groups"), py::arg("anchor_lambda") = 0.0,
        py::arg("anchor_value") = false,
        "(grad norm, anchor value) without changing anything; the anchor value is computed when "
        "anchor_lambda != 0 or anchor_value (else 0), the norm includes the anchor gradient.");
  m.def("sar_perturb", &sar_perturb, py::arg("groups"), py::arg("rho"), py::arg("adaptive"),
        "SAR ascent step with the snapshot as backup. Returns (direction norm, applied).");
  yttt::register_cpu_ops(m);
  m.def("openmp", []() {
#ifdef YTTT_OPENMP
    return true;
#else
    return false;
#endif
  });
  m.def("num_threads", []() {
#ifdef YTTT_OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("yolozu_ttt._C: num_threads must be >= 1");
#ifdef YTTT_OPENMP
    omp_set_num_threads(n);
#endif
  });
}
