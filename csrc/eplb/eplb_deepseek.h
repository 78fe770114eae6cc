// DeepSeek-exact EPLB for one MoE layer: the facts of deepseek-ai/EPLB `eplb.py`, re-implemented
// so that every comparison and every float32 rounding happens in the same order.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace eplb {

// Sizes of one rebalance problem. The global policy is passed as num_groups = num_nodes = 1.
struct Shape {
  int64_t num_experts;   // E, logical experts
  int64_t num_replicas;  // R, physical experts (slots)
  int64_t num_groups;
  int64_t num_nodes;
  int64_t num_gpus;
};

struct PackLoad {
  float load;  // float32, like the reference's running pack sums
  int64_t pack;
  int64_t items;
};

struct ReplicaLoad {
  float per_copy;  // load / copies in float32, as the reference divides
  int64_t expert;
};

// Scratch buffers reused across layers, so the per-layer loop does not allocate.
struct DeepseekWorkspace {
  std::vector<std::pair<float, int64_t>> order;  // (load, item) in packing order
  std::vector<int64_t> pack, rank, log2mlog, mlog2log, phy2mlog, phyrank, mlogcnt;
  std::vector<float> node_weight, phy_weight;
  std::vector<PackLoad> pack_heap;
  std::vector<ReplicaLoad> replica_heap;
};

// weight: [E] float32 loads; group_load: [num_groups] float32 per-group sums (computed by the
// caller with torch, like the reference, so the summation order matches it bit for bit).
// Outputs: phy2log [R], phyrank [R], logcnt [E].
void deepseek_layer(const float* weight, const float* group_load, const Shape& shape,
                    int64_t* phy2log, int64_t* phyrank, int64_t* logcnt, DeepseekWorkspace& ws);

// One row of DeepSeek's module-level helpers, exposed for drop-in parity.
// balanced_packing: w [n] float32 -> pack, rank [n]; n must be a multiple of num_packs.
void balanced_packing_row(const float* w, int64_t n, int64_t num_packs, int64_t* pack,
                          int64_t* rank, DeepseekWorkspace& ws);
// replicate_experts: w [n] float32 -> phy2log, rank [num_phy], cnt [n]; num_phy >= n.
void replicate_experts_row(const float* w, int64_t n, int64_t num_phy, int64_t* phy2log,
                           int64_t* rank, int64_t* cnt, DeepseekWorkspace& ws);

}  // namespace eplb
