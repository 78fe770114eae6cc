// solve: launch of the per-group LP kernel (solve_kernel.cuh). The kernel's variants (padded
// group size GP, sets per rank D) are compiled in separate files; this file only picks one.
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "kernels.cuh"

namespace lplb {

// Defined in solve_kernel.cuh, instantiated in solve_small.cu, solve_gp16.cu, solve_gp32_*.cu.
template <int GP, int D>
void launch_variant(const SolveArgs& args, cudaStream_t stream);

namespace {

template <int GP>
void launch_padded(const SolveArgs& args, cudaStream_t stream) {
  switch (args.n_sets) {
    case 1:
      return launch_variant<GP, 1>(args, stream);
    case 2:
      return launch_variant<GP, 2>(args, stream);
    case 3:
      return launch_variant<GP, 3>(args, stream);
    case 4:
      return launch_variant<GP, 4>(args, stream);
    default:
      throw std::invalid_argument("solve: n_sets=" + std::to_string(args.n_sets) +
                                  " is outside [1, 4]");
  }
}

}  // namespace

void launch_solve(const SolveArgs& args, cudaStream_t stream) {
  if (args.group_size < 2 || args.group_size > 32) {
    throw std::invalid_argument("solve: group_size=" + std::to_string(args.group_size) +
                                " is outside [2, 32]");
  }
  if (args.n_group <= 0) return;
  // The normal matrix is padded to the next of 4, 8, 16, 32 so the unrolled loops are static.
  if (args.group_size <= 4) {
    launch_padded<4>(args, stream);
  } else if (args.group_size <= 8) {
    launch_padded<8>(args, stream);
  } else if (args.group_size <= 16) {
    launch_padded<16>(args, stream);
  } else {
    launch_padded<32>(args, stream);
  }
  check_launch("solve_kernel");
}

}  // namespace lplb
