// The solve kernel for groups of 9 to 16 ranks (GP = 16), every D; see solve_kernel.cuh.
#include "solve_kernel.cuh"

namespace lplb {
template void launch_variant<16, 1>(const SolveArgs& args, cudaStream_t stream);
template void launch_variant<16, 2>(const SolveArgs& args, cudaStream_t stream);
template void launch_variant<16, 3>(const SolveArgs& args, cudaStream_t stream);
template void launch_variant<16, 4>(const SolveArgs& args, cudaStream_t stream);
}  // namespace lplb
