// The solve kernel for groups of 17 to 32 ranks (GP = 32), D = 1, 2; see solve_kernel.cuh.
#include "solve_kernel.cuh"

namespace lplb {
template void launch_variant<32, 1>(const SolveArgs& args, cudaStream_t stream);
template void launch_variant<32, 2>(const SolveArgs& args, cudaStream_t stream);
}  // namespace lplb
