// The module lplb._nvshmem: pybind11 bindings of the NVSHMEM workload exchange (exchange.h).
// Built only when NVSHMEM is found (LPLB_NVSHMEM, CMakeLists.txt), as a module of its own so
// that lplb._C never depends on libnvshmem_host. Tensors arrive as raw addresses and the stream
// as a handle, like lplb._C's launchers; lplb/comm.py validates shapes, dtypes and devices.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "common.cuh"
#include "common/pointers.h"
#include "exchange.h"

namespace py = pybind11;
namespace ex = lplb::exchange;

PYBIND11_MODULE(_nvshmem, m) {
  m.doc() = "lplb NVSHMEM workload exchange (docs/exchange.md)";

  py::class_<ex::Buffers>(m, "Buffers", "Symmetric buffers of one exchange (allocate())")
      .def_readonly("n", &ex::Buffers::n)
      .def_readonly("rank", &ex::Buffers::rank)
      .def_readonly("world", &ex::Buffers::world)
      .def_readonly("load_store", &ex::Buffers::load_store);

  m.def(
      "unique_id", [] { return py::bytes(ex::unique_id()); },
      "NVSHMEM unique id (bytes) for the unique-id bootstrap; call on one rank, broadcast.");
  m.def("init_status", &ex::init_status, "nvshmemx_init_status() of the loaded host library.");
  m.def(
      "init",
      [](int device, py::bytes uid, int rank, int world) {
        return ex::init(device, std::string(uid), rank, world);
      },
      py::arg("device"), py::arg("uid"), py::arg("rank"), py::arg("world"),
      "Collective: initialise NVSHMEM with the unique-id bootstrap; returns (my_pe, n_pes).");
  m.def("attach", &ex::attach, py::arg("device"),
        "Register this module with an NVSHMEM runtime already initialised in the process "
        "(e.g. by DeepEP); returns (my_pe, n_pes).");
  m.def("allocate", &ex::allocate, py::arg("device"), py::arg("n"),
        py::arg("allow_load_store") = true,
        "Collective: symmetric buffers for workloads of n experts; the load/store protocol when "
        "allowed and every peer is reachable by loads and stores, else put with signal.");
  m.def(
      "sum",
      [](int device, const ex::Buffers& buffers, std::uintptr_t input, std::uintptr_t output,
         std::uintptr_t sequence, std::uintptr_t stream) {
        ex::launch_sum(device, buffers, common::address<const std::int32_t>(input),
                       common::address<std::int32_t>(output),
                       common::address<std::uint64_t>(sequence),
                       lplb::as_stream(stream));
      },
      py::arg("device"), py::arg("buffers"), py::arg("input"), py::arg("output"),
      py::arg("sequence"), py::arg("stream"),
      "Launch the exchange kernel: output[n] int32 = sum over PEs of input[n] int32.");
  m.def("finalize", &ex::finalize, "Collective: nvshmem_finalize() for this module.");
  m.attr("build_version") = ex::build_version();
  m.def("runtime_version", &ex::runtime_version, "Version of the loaded NVSHMEM host library.");
}
