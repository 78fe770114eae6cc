#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_eplb_cpu(py::module_& m) { (void)m; }
