// The solve kernel for groups of up to 8 ranks (GP = 4, 8), every D; see solve_kernel.cuh.
#include "solve_kernel.cuh"

namespace lplb {
template void launch_variant<4, 1>(const SolveArgs& args, cudaStream_t stream);
template void launch_variant<4, 2>(const SolveArgs& args, cudaStream_t stream);
template void launch_variant<4, 3>(const SolveArgs& args, cudaStream_t stream);
template void launch_variant<4, 4>(const SolveArgs& args, cudaStream_t stream);
template void launch_variant<8, 1>(const SolveArgs& args, cudaStream_t stream);
template void launch_variant<8, 2>(const SolveArgs& args, cudaStream_t stream);
template void launch_variant<8, 3>(const SolveArgs& args, cudaStream_t stream);
template void launch_variant<8, 4>(const SolveArgs& args, cudaStream_t stream);
}  // namespace lplb
