// solve: launch of the per-group LP kernel (solve_kernel.cuh) for the topology's sets per rank.
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "kernels.cuh"
#include "solve_kernel.cuh"

namespace lplb {

void launch_solve(const SolveArgs& args, cudaStream_t stream) {
  if (args.group_size < 2 || args.group_size > 32) {
    throw std::invalid_argument("solve: group_size=" + std::to_string(args.group_size) +
                                " is outside [2, 32]");
  }
  if (args.n_group <= 0) return;
  switch (args.n_sets) {
    case 1:
      launch_variant<1>(args, stream);
      break;
    case 2:
      launch_variant<2>(args, stream);
      break;
    case 3:
      launch_variant<3>(args, stream);
      break;
    case 4:
      launch_variant<4>(args, stream);
      break;
    default:
      throw std::invalid_argument("solve: n_sets=" + std::to_string(args.n_sets) +
                                  " is outside [1, 4]");
  }
}

}  // namespace lplb
