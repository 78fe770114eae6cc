// Entry point of the extension module lplb._C. Each part of csrc/ registers its own functions,
// so that the CPU-only build and the CUDA build share this file.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_eplb_cpu(py::module_& m);
#ifdef LPLB_WITH_CUDA
void register_cuda(py::module_& m);
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "lplb native extension: CPU EPLB algorithm and (optionally) CUDA kernels";
#ifdef LPLB_WITH_CUDA
  m.attr("has_cuda") = true;
  register_cuda(m);
#else
  m.attr("has_cuda") = false;
#endif
  register_eplb_cpu(m);
}
