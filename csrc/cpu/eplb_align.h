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

// placement, old: [R] logical ids of one layer (old may hold -1 and repeats). Writes to `out` the
// placement with its GPUs permuted (within nodes, nodes as units) and slots reordered to match
// `old` as far as possible, and returns how many slots of `out` differ from `old`. `placement`
// must be duplicate-free and respect the node layout of `shape`; per-GPU loads are unchanged.
int64_t align_to_old(const int64_t* placement, const int64_t* old, const Shape& shape,
                     int64_t* out);

}  // namespace eplb
