// pybind11 module yolozu_ttt._C: the binding table of the fused CPU update engine. The engine
// lives in update.{h,cpp} (ArenaGroup and its passes) and engine.{h,cpp} (the calls below).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "engine.h"

namespace py = pybind11;
using yttt::ArenaGroup;
using yttt::StepOptions;

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

  // How many scalars each call writes into `out` (their names and order: yolozu_ttt.common).
  m.attr("NUM_STATS") = static_cast<int>(yttt::Stat::Count);
  m.attr("NUM_GRAD_STATS") = static_cast<int>(yttt::GradStat::Count);
  m.attr("NUM_SAR_STATS") = static_cast<int>(yttt::SarStat::Count);
  // The constants shared with yolozu_ttt/kernels/constants.py, by its names.
  py::dict constants;
  constants["CLIP_EPS"] = yttt::kClipEps;
  constants["SAR_EPS"] = yttt::kSarEps;
  constants["FMIX32_M1"] = yttt::kFmix32M1;
  constants["FMIX32_M2"] = yttt::kFmix32M2;
  constants["RESTORE_SEED_MIX"] = yttt::kRestoreSeedMix;
  constants["RESTORE_COUNTER_MUL"] = yttt::kRestoreCounterMul;
  constants["RESTORE_GROUP_MUL"] = yttt::kRestoreGroupMul;
  constants["UNIFORM_BITS"] = yttt::kUniformBits;
  m.attr("CONSTANTS") = constants;

  py::class_<StepOptions>(m, "StepOptions")
      .def(py::init(&yttt::step_options), py::arg("spec"),
           "A fused step's options from a yolozu_ttt.engine.StepSpec (its fields, read once, "
           "already validated by the spec: nothing here checks a value). Built once per spec and "
           "passed to every fused_step of it.")
      .def_readonly("lr", &StepOptions::lr)
      .def_readonly("betas", &StepOptions::betas)
      .def_readonly("eps", &StepOptions::eps)
      .def_readonly("max_grad_norm", &StepOptions::max_grad_norm)
      .def_readonly("anchor_lambda", &StepOptions::anchor_lambda)
      .def_readonly("write_snapshot", &StepOptions::write_snapshot)
      .def_readonly("ema_momentum", &StepOptions::ema_momentum)
      .def_readonly("restore_prob", &StepOptions::restore_prob)
      .def_readonly("restore_seed", &StepOptions::restore_seed);

  m.def("fused_step", &yttt::fused_step, py::arg("groups"), py::arg("out"), py::arg("options"),
        py::arg("restore_counter") = 0, py::arg("gate") = py::none(),
        "One fused step of `options` (a StepOptions) over all groups: grad norm, clip, Adam "
        "(torch defaults), snapshot, update and total-update norms; with ema_momentum, the "
        "teacher EMA on the updated params, and with restore_prob > 0 the CoTTA stochastic "
        "restore to base (counter-based RNG keyed by restore_seed and restore_counter). gate: "
        "None, or a 1-element float64 CPU tensor read at the call: 0 applies nothing (as if no "
        "segment had a grad). Writes out[0:NUM_STATS] (out: a contiguous float64 CPU tensor) in "
        "the order of yolozu_ttt.common.STAT_KEYS.");
  m.def("restore_key", &yttt::restore_key, py::arg("seed"), py::arg("counter"), py::arg("group"),
        "The 32-bit key of the counter-based restore RNG for one group and step.");
  m.def("grad_stats", &yttt::grad_stats, py::arg("groups"), py::arg("out"),
        py::arg("anchor_lambda") = 0.0, py::arg("anchor_value") = false,
        "Writes out[0:NUM_GRAD_STATS] = (grad norm, anchor value) (yolozu_ttt.common."
        "GRAD_STAT_KEYS) without changing anything; the anchor value is computed when "
        "anchor_lambda != 0 or anchor_value (else 0), the norm includes the anchor gradient.");
  m.def("sar_perturb", &yttt::sar_perturb, py::arg("groups"), py::arg("out"), py::arg("rho"),
        py::arg("adaptive"),
        "SAR ascent step with the snapshot as backup (written whenever rho > 0; the ascent unless "
        "the direction norm is zero, a NaN norm making the parameters with a grad NaN). Writes "
        "out[0:NUM_SAR_STATS] = (direction norm, applied as 1.0/0.0) (yolozu_ttt.common.SAR_STAT_KEYS).");
  m.def("openmp", &yttt::openmp_enabled, "Whether the module was built with OpenMP.");
  m.def("num_threads", &yttt::num_threads, "OpenMP's thread count (1 without OpenMP).");
  m.def("set_num_threads", &yttt::set_num_threads, py::arg("n"), "Set OpenMP's thread count (n >= 1).");
}
