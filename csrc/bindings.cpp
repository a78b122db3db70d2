// pybind11 module yolozu_ttt._C: the only binding layer of the fused CPU update engine. The engine
// (update.{h,cpp}: ArenaGroup and its passes; engine.{h,cpp}: the calls) is plain C++; this file
// converts: Python tensors to Buffers (the checks whose errors name a tensor's Python side: type,
// device, contiguity, dtype), a StepSpec to StepOptions, the engine's errors to Python's (its
// std::invalid_argument is a ValueError by pybind11's rule, its TypeError a TypeError), and it
// releases the GIL around the numeric work.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine.h"

namespace py = pybind11;
using yttt::ArenaGroup;
using yttt::Buffer;
using yttt::Buffers;
using yttt::DType;
using yttt::StepOptions;

namespace {

// What a buffer holds: parameter storage (float32, bfloat16 or float16; another dtype is a
// TypeError) or a call's float64 stats output (another dtype is a ValueError, like a wrong size).
enum class Holds { Storage, Stats };

std::string named(const char* what) { return std::string("yolozu_ttt._C: ") + what; }

DType parse_dtype(const std::string& s, const char* what) {
  if (s == "torch.float32") return DType::F32;
  if (s == "torch.bfloat16") return DType::BF16;
  if (s == "torch.float16") return DType::F16;
  throw py::type_error(named(what) + " has unsupported dtype " + s + " (expected float32, bfloat16 or float16)");
}

// The owner of a Buffer: a reference to the Python object, dropped under the GIL.
std::shared_ptr<void> keep_alive(const py::handle& obj) {
  return std::shared_ptr<void>(new py::object(py::reinterpret_borrow<py::object>(obj)), [](void* p) {
    py::gil_scoped_acquire gil;
    delete static_cast<py::object*>(p);
  });
}

// `tensor` (a contiguous CPU torch tensor; None when allow_none: an unset Buffer) as a Buffer that
// keeps it alive; errors name it `what`.
Buffer to_buffer(const py::handle& tensor, const char* what, bool allow_none, Holds holds = Holds::Storage) {
  Buffer b;
  if (tensor.is_none()) {
    if (allow_none) return b;
    throw py::value_error(named(what) + " must be a tensor, got None");
  }
  if (!py::hasattr(tensor, "data_ptr") || !py::hasattr(tensor, "is_contiguous"))
    throw py::type_error(named(what) + " must be a torch.Tensor");
  if (py::str(tensor.attr("device").attr("type")).cast<std::string>() != "cpu")
    throw py::value_error(named(what) + " must be a CPU tensor");
  if (!tensor.attr("is_contiguous")().cast<bool>()) throw py::value_error(named(what) + " must be contiguous");
  const std::string dtype = py::str(tensor.attr("dtype")).cast<std::string>();
  if (holds == Holds::Stats) {
    if (dtype != "torch.float64") throw py::value_error(named(what) + " must be float64, got " + dtype);
    b.dtype = DType::F64;
  } else {
    b.dtype = parse_dtype(dtype, what);
  }
  b.owner = keep_alive(tensor);
  b.ptr = reinterpret_cast<void*>(tensor.attr("data_ptr")().cast<uintptr_t>());
  b.numel = tensor.attr("numel")().cast<int64_t>();
  return b;
}

// A per-element state: a flat tensor, or a list (tuple) of one contiguous tensor per segment.
Buffers to_buffers(const py::object& obj, const char* what) {
  Buffers out;
  if (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj)) {
    out.per_segment = true;
    const std::string seg_what = std::string(what) + " segment";
    for (auto item : py::sequence(obj)) out.items.push_back(to_buffer(item, seg_what.c_str(), false));
    return out;
  }
  out.items.push_back(to_buffer(obj, what, false));
  return out;
}

// The same, None: unset.
std::optional<Buffers> to_optional(const py::object& obj, const char* what) {
  if (obj.is_none()) return std::nullopt;
  return to_buffers(obj, what);
}

// The has-grad flags: None (unset), or a byte buffer (e.g. the autograd hooks' bytearray).
Buffer to_flags(const py::object& obj) {
  Buffer b;
  if (obj.is_none()) return b;
  py::buffer_info info = py::buffer(obj).request();
  if (info.itemsize != 1)
    throw py::value_error("yolozu_ttt._C: has_grad must be a byte buffer with one entry per segment");
  b.owner = keep_alive(obj);
  b.ptr = info.ptr;
  b.numel = static_cast<int64_t>(info.size);
  return b;
}

std::vector<ArenaGroup*> to_groups(const py::list& groups) {
  std::vector<ArenaGroup*> out;
  out.reserve(groups.size());
  for (auto item : groups) out.push_back(item.cast<ArenaGroup*>());
  return out;
}

// A step's options from a yolozu_ttt.engine.StepSpec (any object with its fields), read once;
// the spec has validated them.
// The groups and the stats buffer of a call that steps nothing else (grad_stats, sar_perturb),
// converted with the GIL held, then ``call(groups, out)`` run without it.
template <class Call>
void on_groups(const py::list& groups, const py::object& out, Call&& call) {
  const auto gs = to_groups(groups);
  const Buffer o = to_buffer(out, "out", false, Holds::Stats);
  py::gil_scoped_release release;
  call(gs, o);
}

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

// The engine's group object: ArenaGroup and its buffers' setters.
void bind_arena_group(py::module_& m) {
  py::class_<ArenaGroup>(m, "ArenaGroup")
      .def(py::init([](const py::object& param, const py::object& grad, const py::object& exp_avg,
                       const py::object& exp_avg_sq, const py::object& base, const py::object& snap,
                       std::vector<int64_t> offsets, std::vector<int64_t> sizes, const py::object& has_grad,
                       int64_t rows) {
             Buffer p = to_buffer(param, "param", false), g = to_buffer(grad, "grad", false);
             return std::make_unique<ArenaGroup>(std::move(p), std::move(g), to_buffers(exp_avg, "exp_avg"),
                                                 to_buffers(exp_avg_sq, "exp_avg_sq"), to_buffers(base, "base"),
                                                 to_optional(snap, "snap"), std::move(offsets), std::move(sizes),
                                                 to_flags(has_grad), rows);
           }),
           py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
           py::arg("base"), py::arg("snap"), py::arg("offsets"), py::arg("sizes"),
           py::arg("has_grad") = py::none(), py::arg("rows") = 1,
           "Bind the buffers of one (device, dtype) arena of `rows` rows (K replicas: every "
           "per-element buffer holds K rows; flat: K x the row's elements, row-major; per segment: "
           "K x the segment's elements). base, exp_avg and exp_avg_sq are flat or one tensor per "
           "segment; has_grad is shared by the rows. The group keeps every tensor alive; segments "
           "(offsets, sizes) must tile one row in order.")
      .def_property_readonly("rows", &ArenaGroup::rows)
      .def_property_readonly("steps", &ArenaGroup::steps)
      .def("reset_state", &ArenaGroup::reset_state,
           "Fresh Adam state: step counts to 0 (a segment's first step starts its moments at 0).")
      .def(
          "set_teacher",
          [](ArenaGroup& g, const py::object& teacher) { g.set_teacher(to_optional(teacher, "teacher")); },
          py::arg("teacher"),
           "Bind (or with None, unbind) the CoTTA teacher buffer: flat like param, or a list "
           "with one tensor per segment.")
      .def(
          "set_base", [](ArenaGroup& g, const py::object& base) { g.set_base(to_buffers(base, "base")); },
          py::arg("base"),
           "Bind the base snapshot (the anchor of the total-update norm, EATA and the CoTTA "
           "restore): a flat tensor like param, or a list with one contiguous tensor per segment.")
      .def(
          "set_moments",
          [](ArenaGroup& g, const py::object& exp_avg, const py::object& exp_avg_sq) {
            g.set_moments(to_buffers(exp_avg, "exp_avg"), to_buffers(exp_avg_sq, "exp_avg_sq"));
          },
          py::arg("exp_avg"), py::arg("exp_avg_sq"),
           "Bind the float32 Adam moments (flat, or a list with one tensor per segment) and reset "
           "the step counts; a segment's first step zeroes its moments before reading them.")
      .def(
          "set_snapshot", [](ArenaGroup& g, const py::object& snap) { g.set_snapshot(to_optional(snap, "snap")); },
          py::arg("snap"),
           "Bind (or with None, unbind) the pre-step snapshot buffer: flat like param, or a list "
           "with one tensor per segment. It may be the grad buffer (the step reads each grad "
           "before writing the snapshot over it), except for sar_perturb, whose backup must "
           "outlive the next backward.");

}

// A step's options and the engine's calls.
void bind_calls(py::module_& m) {
  py::class_<StepOptions>(m, "StepOptions")
      .def(py::init(&step_options), py::arg("spec"),
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

  m.def(
      "fused_step",
      [](const py::list& groups, const py::object& out, const StepOptions& options, uint64_t restore_counter,
         const py::object& gate, const std::optional<std::vector<uint64_t>>& seeds) {
        const auto gs = to_groups(groups);
        const Buffer o = to_buffer(out, "out", false, Holds::Stats), gt = to_buffer(gate, "gate", true, Holds::Stats);
        const std::vector<uint64_t> row_seeds = seeds.value_or(std::vector<uint64_t>{});
        py::gil_scoped_release release;
        yttt::fused_step(gs, o, options, restore_counter, gt, row_seeds);
      },
      py::arg("groups"), py::arg("out"), py::arg("options"),
        py::arg("restore_counter") = 0, py::arg("gate") = py::none(), py::arg("seeds") = py::none(),
        "One fused step of `options` (a StepOptions) over all groups (the same K rows each), every "
        "row with its own: grad norm, clip, Adam step counts (torch defaults), snapshot, update and "
        "total-update norms; with ema_momentum, the teacher EMA on the updated params, and with "
        "restore_prob > 0 the CoTTA stochastic restore to base (counter-based RNG keyed by the "
        "row's seed and restore_counter). gate: None, or a float64 CPU tensor of K elements read "
        "at the call: 0 makes its row apply nothing (as if no segment had a grad). seeds: None "
        "(restore_seed for every row) or K ints. Writes out[r*NUM_STATS:(r+1)*NUM_STATS] for row "
        "r (out: a contiguous float64 CPU tensor) in the order of yolozu_ttt.common.STAT_KEYS.");
  m.def("restore_key", &yttt::restore_key, py::arg("seed"), py::arg("counter"), py::arg("group"),
        "The 32-bit key of the counter-based restore RNG for one group and step.");
  m.def(
      "grad_stats",
      [](const py::list& groups, const py::object& out, double anchor_lambda, bool anchor_value) {
        on_groups(groups, out, [&](const auto& gs, const Buffer& o) { yttt::grad_stats(gs, o, anchor_lambda, anchor_value); });
      },
      py::arg("groups"), py::arg("out"),
        py::arg("anchor_lambda") = 0.0, py::arg("anchor_value") = false,
        "Writes out[r*NUM_GRAD_STATS:(r+1)*NUM_GRAD_STATS] = row r's (grad norm, anchor value) "
        "(yolozu_ttt.common.GRAD_STAT_KEYS) without changing anything; the anchor value is computed when "
        "anchor_lambda != 0 or anchor_value (else 0), the norm includes the anchor gradient.");
  m.def(
      "sar_perturb",
      [](const py::list& groups, const py::object& out, double rho, bool adaptive) {
        on_groups(groups, out, [&](const auto& gs, const Buffer& o) { yttt::sar_perturb(gs, o, rho, adaptive); });
      },
      py::arg("groups"), py::arg("out"), py::arg("rho"),
        py::arg("adaptive"),
        "SAR ascent step of every row by its own direction norm, with the snapshot as backup (written whenever rho > 0; the ascent unless "
        "the direction norm is zero, a NaN norm making the parameters with a grad NaN). Writes "
        "row r's out[r*NUM_SAR_STATS:(r+1)*NUM_SAR_STATS] = (direction norm, applied as 1.0/0.0) (yolozu_ttt.common.SAR_STAT_KEYS).");
  m.def("openmp", &yttt::openmp_enabled, "Whether the module was built with OpenMP.");
  m.def("num_threads", &yttt::num_threads, "OpenMP's thread count (1 without OpenMP).");
  m.def("set_num_threads", &yttt::set_num_threads, py::arg("n"), "Set OpenMP's thread count (n >= 1).");
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "yolozu_ttt fused CPU update engine (flat parameter arena, OpenMP)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const yttt::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });

  bind_arena_group(m);
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

  bind_calls(m);
}
