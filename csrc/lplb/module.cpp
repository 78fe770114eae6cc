// Entry point of the extension module lplb._C. The CUDA kernels register their launchers here
// when the build has them; a CPU-only build still provides the module (has_cuda = False).
#include <pybind11/pybind11.h>

namespace py = pybind11;

#ifdef LPLB_WITH_CUDA
void register_cuda(py::module_& m);
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "lplb native extension: the CUDA kernels of LPLB (when built with CUDA)";
#ifdef LPLB_WITH_CUDA
  m.attr("has_cuda") = true;
  register_cuda(m);
#else
  m.attr("has_cuda") = false;
#endif
}
