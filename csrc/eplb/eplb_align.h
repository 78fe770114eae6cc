// Keeping a new placement close to an old one: relabel GPUs (and, for the hierarchical policy,
// nodes as units) to maximise the experts that stay on their GPU, then keep them in their slots.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "eplb_deepseek.h"

namespace eplb {

// Maximum-weight perfect matching of an n x n matrix (row-major): returns the column of each row.
// Hungarian algorithm with potentials, O(n^3); integer weights keep it exact.
std::vector<int> max_weight_assignment(const std::vector<int64_t>& weight, int n);

// placement, old: [R] logical ids of one layer (old may hold -1 and repeats); weight: [E] loads.
// Writes to `out` the placement with its GPUs permuted (within nodes, nodes as units) to keep the
// most experts on their old GPU, slots reordered so that those keep their old slot, and then
// copies swapped between GPUs of a node where that restores more old slots without making any
// GPU heavier than the heaviest one. Returns how many slots of `out` differ from `old`.
// `placement` must be duplicate-free and respect the node layout of `shape`. Copy counts do not
// change, and the heaviest GPU load does not grow.
int64_t align_to_old(const int64_t* placement, const int64_t* old, const double* weight,
                     const Shape& shape, int64_t* out);

}  // namespace eplb
