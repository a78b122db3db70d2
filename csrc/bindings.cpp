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

py::dict fused_step(const py::list& groups, double lr, double beta1, double beta2, double eps,
                    py::object max_grad_norm, double anchor_lambda, bool write_snapshot) {
  if (!(lr >= 0.0)) throw py::value_error("yolozu_ttt._C: lr must be >= 0");
  if (!(beta1 >= 0.0 && beta1 < 1.0) || !(beta2 >= 0.0 && beta2 < 1.0))
    throw py::value_error("yolozu_ttt._C: betas must lie in [0, 1)");
  const auto gs = as_groups(groups);
  const bool clip = !max_grad_norm.is_none();
  const double max_norm = clip ? max_grad_norm.cast<double>() : 0.0;
  StepStats total;
  float coef = 1.0f;
  {
    py::gil_scoped_release release;
    if (clip) {
      double gsq = 0.0;
      for (auto* g : gs) gsq += g->grad_pass(anchor_lambda).grad_sumsq;
      coef = clip_coefficient(gsq, max_norm);
    }
    for (auto* g : gs) {
      const StepStats s = g->adam_pass(lr, beta1, beta2, eps, coef, anchor_lambda, write_snapshot);
      total.grad_sumsq += s.grad_sumsq;
      total.clipped_grad_sumsq += s.clipped_grad_sumsq;
      total.update_sumsq += s.update_sumsq;
      total.total_sumsq += s.total_sumsq;
      total.anchor += s.anchor;
    }
  }
  py::dict out;
  out["grad_norm"] = f32_norm(total.grad_sumsq);
  out["grad_norm_clipped"] = f32_norm(total.clipped_grad_sumsq);
  out["update_norm"] = f32_norm(total.update_sumsq);
  out["total_update_norm"] = f32_norm(total.total_sumsq);
  out["anchor_loss"] = total.anchor;
  out["clip_coef"] = static_cast<double>(coef);
  return out;
}

py::tuple grad_stats(const py::list& groups, double anchor_lambda) {
  const auto gs = as_groups(groups);
  StepStats total;
  {
    py::gil_scoped_release release;
    for (auto* g : gs) {
      const StepStats s = g->grad_pass(anchor_lambda);
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
           "Bind the flat buffers of one (device, dtype) arena. The group keeps every tensor "
           "alive; segments (offsets, sizes) must tile the arena in order.")
      .def_property_readonly("numel", &ArenaGroup::numel)
      .def_property_readonly("num_segments", &ArenaGroup::num_segments)
      .def_property_readonly("steps", &ArenaGroup::steps)
      .def("reset_state", &ArenaGroup::reset_state, "Zero the Adam moments and step counts.");

  m.def("fused_step", &fused_step, py::arg("groups"), py::arg("lr"), py::arg("beta1") = 0.9,
        py::arg("beta2") = 0.999, py::arg("eps") = 1e-8, py::arg("max_grad_norm") = py::none(),
        py::arg("anchor_lambda") = 0.0, py::arg("write_snapshot") = true,
        "One fused step over all groups: grad norm, clip, Adam (torch defaults), snapshot, "
        "update and total-update norms. Returns a dict of Python floats.");
  m.def("grad_stats", &grad_stats, py::arg("groups"), py::arg("anchor_lambda") = 0.0,
        "(grad norm, anchor value) without changing anything.");
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
