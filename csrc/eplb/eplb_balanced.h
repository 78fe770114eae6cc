// The "balanced" policy for one MoE layer: a duplicate-free placement whose heaviest GPU is no
// heavier than the DeepSeek placement's (guaranteed where that one is duplicate-free, searched
// for where it is not), optionally kept close to an old placement.
#pragma once

#include <cstdint>
#include <vector>

#include "eplb_deepseek.h"
#include "eplb_placement.h"

namespace eplb {

struct BalancedWorkspace {
  NodePlacement placement;
  std::vector<int64_t> node_experts, fresh, near, aligned, count;
  std::vector<int> local_of, start, copies, holders, last_gpu, empty, best_slots;
  std::vector<double> node_weight;
};

// weight: [E] float64 loads; deepseek: [R] the DeepSeek placement of this layer (its node layout
// is kept); old: [R] a previous placement or nullptr. Writes phy2log [R] and returns how many
// slots differ from `old` (0 without it).
int64_t balanced_layer(const double* weight, const Shape& shape, const int64_t* deepseek,
                       const int64_t* old, int64_t* phy2log, BalancedWorkspace& ws);

}  // namespace eplb
