// pybind11 entry points of the CUDA kernels. Tensors arrive as raw device pointers (Python passes
// tensor.data_ptr()), sizes and a stream handle (torch.cuda.current_stream().cuda_stream), so the
// module never links libtorch. Shape and dtype validation happens in lplb/cuda_ops.py; these
// wrappers only select the device and launch.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common.cuh"
#include "common/pointers.h"
#include "kernels.cuh"

namespace py = pybind11;

namespace {

using common::address;

// The statically linked runtime keeps its own current device; launch on the tensors' device.
void use_device(int device) { lplb::check_cuda(cudaSetDevice(device), "cudaSetDevice"); }

}  // namespace

// The eager fast path of Planner.run (csrc/lplb/cuda_run.cpp).
void register_run(py::module_& m);

void register_cuda(py::module_& m) {
  m.def(
      "count_idx_cuda",
      [](int device, std::uintptr_t idx, bool idx_int64, std::int64_t n, int n_logical,
         int n_sms, std::uintptr_t workload, std::uintptr_t workload_by_sm,
         std::uintptr_t error_flag, std::uintptr_t stream) {
        use_device(device);
        lplb::launch_count_idx(address<const void>(idx), idx_int64, n, n_logical, n_sms,
                               address<std::int32_t>(workload), address<std::int32_t>(workload_by_sm),
                               address<std::int32_t>(error_flag), lplb::as_stream(stream));
      },
      "Launch count_idx: per-expert counts and their running totals over n_sms chunks.");

  m.def(
      "solve_cuda",
      [](int device, std::uintptr_t workload, int workload_type, int n_logical,
         std::uintptr_t phy2log, std::int64_t n_physical, std::uintptr_t r2o, std::uintptr_t o2r,
         std::uintptr_t avail_counter, bool avail_int64, int group_size, int n_sets,
         int n_group, int n_local_logical, int n_local_routed, int n_combined,
         std::uintptr_t probs, std::uintptr_t stream) {
        use_device(device);
        lplb::SolveArgs args{};
        args.workload = address<const void>(workload);
        args.workload_type = static_cast<lplb::WorkloadType>(workload_type);
        args.n_logical = n_logical;
        args.phy2log = address<const std::int32_t>(phy2log);
        args.n_physical = n_physical;
        args.r2o = address<const std::int32_t>(r2o);
        args.o2r = address<const std::int32_t>(o2r);
        args.avail_counter = address<void>(avail_counter);
        args.avail_int64 = avail_int64;
        args.group_size = group_size;
        args.n_sets = n_sets;
        args.n_group = n_group;
        args.n_local_logical = n_local_logical;
        args.n_local_routed = n_local_routed;
        args.n_combined = n_combined;
        args.probs = address<float>(probs);
        lplb::launch_solve(args, lplb::as_stream(stream));
      },
      "Launch the exact LP solve (augmenting paths, docs/lp.md), one 32-thread block per group.");

  m.def(
      "map_idx_cuda",
      [](int device, std::uintptr_t idx, bool idx_int64, std::int64_t n, std::uintptr_t out,
         std::uintptr_t probs, std::int64_t n_probs, std::uintptr_t workload_by_sm, int n_sms,
         int n_logical, std::uintptr_t log2phy, std::uintptr_t prob_index,
         std::uintptr_t error_flag, std::uintptr_t stream) {
        use_device(device);
        lplb::launch_map_idx(address<const void>(idx), idx_int64, n, address<void>(out),
                             address<const float>(probs), n_probs,
                             address<const std::int32_t>(workload_by_sm), n_sms, n_logical,
                             address<const std::int32_t>(log2phy),
                             address<const std::int32_t>(prob_index),
                             address<std::int32_t>(error_flag), lplb::as_stream(stream));
      },
      "Launch map_idx: route each replicated expert's tokens to original or replica.");

  m.attr("workload_types") =
      py::dict(py::arg("int32") = static_cast<int>(lplb::WorkloadType::kInt32),
               py::arg("int64") = static_cast<int>(lplb::WorkloadType::kInt64),
               py::arg("float32") = static_cast<int>(lplb::WorkloadType::kFloat32),
               py::arg("float64") = static_cast<int>(lplb::WorkloadType::kFloat64));

  register_run(m);
}
