#include "eplb_balanced.h"

#include <algorithm>
#include <cassert>

#include "eplb_align.h"

namespace eplb {
namespace {

// Heaviest GPU of a placement, a copy of e carrying weight[e] / (copies of e).
double max_gpu_load(const double* weight, const int64_t* phy2log, const Shape& shape,
                    std::vector<int64_t>& count) {
  const int64_t S = shape.num_replicas / shape.num_gpus;
  count.assign(shape.num_experts, 0);
  for (int64_t p = 0; p < shape.num_replicas; ++p) count[phy2log[p]] += 1;
  double heaviest = 0.0;
  for (int64_t g = 0; g < shape.num_gpus; ++g) {
    double load = 0.0;
    for (int64_t p = g * S; p < (g + 1) * S; ++p) load += weight[phy2log[p]] / count[phy2log[p]];
    heaviest = std::max(heaviest, load);
  }
  return heaviest;
}

bool has_duplicate(const int64_t* phy2log, const Shape& shape) {
  const int64_t S = shape.num_replicas / shape.num_gpus;
  std::vector<int64_t> last_gpu(shape.num_experts, -1);
  for (int64_t p = 0; p < shape.num_replicas; ++p) {
    const int64_t e = phy2log[p];
    if (last_gpu[e] == p / S) return true;
    last_gpu[e] = p / S;
  }
  return false;
}

// Reads which experts each node holds in `phy2log` into ws.node_experts ([nodes, E / nodes],
// ascending) and ws.local_of. False when the placement cannot seed this shape: an expert on two
// nodes, a group split across nodes, or a node without exactly E / nodes experts. With one node
// every expert belongs to it, placed or not.
bool read_node_layout(const int64_t* phy2log, const Shape& shape, BalancedWorkspace& ws) {
  const int64_t E = shape.num_experts, N = shape.num_nodes;
  const int64_t per_node = E / N, phy_per_node = shape.num_replicas / N;
  const int64_t group_size = E / shape.num_groups;
  std::vector<int64_t> node_of(E, N == 1 ? 0 : -1);
  for (int64_t p = 0; p < shape.num_replicas; ++p) {
    const int64_t e = phy2log[p];
    if (e < 0) continue;
    if (node_of[e] >= 0 && node_of[e] != p / phy_per_node) return false;
    node_of[e] = p / phy_per_node;
  }
  std::vector<int64_t> filled(N, 0);
  ws.node_experts.resize(E);
  ws.local_of.resize(E);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t node = node_of[e];
    if (node < 0 || node != node_of[e - e % group_size] || filled[node] == per_node) return false;
    ws.local_of[e] = static_cast<int>(filled[node]);
    ws.node_experts[node * per_node + filled[node]++] = e;
  }
  return true;
}

// Places every node of the layout in ws, starting from `start` ([R], -1 = empty) and, when
// `from_scratch`, also from empty GPUs; keeps the lighter result per node. Writes the placement
// to `out` ([R]) and returns its heaviest GPU load.
double solve_nodes(const double* weight, const Shape& shape, const int64_t* start,
                   bool from_scratch, std::vector<int64_t>& out, BalancedWorkspace& ws) {
  const int N = static_cast<int>(shape.num_nodes);
  const int n = static_cast<int>(shape.num_experts / N);
  const int G = static_cast<int>(shape.num_gpus / N);
  const int S = static_cast<int>(shape.num_replicas / shape.num_gpus);
  const int phy_per_node = G * S;
  NodePlacement& placement = ws.placement;
  out.resize(shape.num_replicas);
  ws.node_weight.resize(n);
  ws.start.resize(phy_per_node);
  ws.local_count.resize(n);
  double heaviest = 0.0;
  for (int node = 0; node < N; ++node) {
    const int64_t* experts = ws.node_experts.data() + static_cast<int64_t>(node) * n;
    for (int i = 0; i < n; ++i) ws.node_weight[i] = weight[experts[i]];
    std::fill(ws.local_count.begin(), ws.local_count.end(), 0);
    for (int k = 0; k < phy_per_node; ++k) {
      const int64_t e = start[static_cast<int64_t>(node) * phy_per_node + k];
      ws.start[k] = e < 0 ? -1 : ws.local_of[e];
      if (e >= 0) ws.local_count[ws.start[k]] += 1;
    }
    placement.reset(ws.node_weight.data(), n, G, S);
    placement.build(ws.start.data(), ws.local_count.data());
    placement.improve();
    double best = placement.max_load();
    std::vector<int> best_slots = placement.slots();
    if (from_scratch) {
      std::fill(ws.start.begin(), ws.start.end(), -1);
      placement.build(ws.start.data(), nullptr);
      placement.improve();
      if (placement.max_load() < best) {
        best = placement.max_load();
        best_slots = placement.slots();
      }
    }
    for (int k = 0; k < phy_per_node; ++k) {
      out[static_cast<int64_t>(node) * phy_per_node + k] = experts[best_slots[k]];
    }
    heaviest = std::max(heaviest, best);
  }
  return heaviest;
}

}  // namespace

int64_t balanced_layer(const double* weight, const Shape& shape, const int64_t* deepseek,
                       const int64_t* old, int64_t* phy2log, BalancedWorkspace& ws) {
  const int64_t R = shape.num_replicas;
  const bool layout_ok = read_node_layout(deepseek, shape, ws);
  assert(layout_ok);
  (void)layout_ok;
  double best = solve_nodes(weight, shape, deepseek, /*from_scratch=*/true, ws.fresh, ws);
  // Where DeepSeek's own placement is duplicate-free and ours is not clearly better, keep it:
  // then even the last bit of every balance metric is the reference's.
  const double reference = max_gpu_load(weight, deepseek, shape, ws.count);
  if (!has_duplicate(deepseek, shape) && !(best < reference * (1.0 - 1e-12))) {
    ws.fresh.assign(deepseek, deepseek + R);
    best = reference;
  }
  if (old == nullptr) {
    std::copy(ws.fresh.begin(), ws.fresh.end(), phy2log);
    return 0;
  }
  // A placement grown from the old one moves fewer experts; take it if it balances as well.
  const std::vector<int64_t>* chosen = &ws.fresh;
  if (read_node_layout(old, shape, ws) &&
      solve_nodes(weight, shape, old, /*from_scratch=*/false, ws.near, ws) <= best) {
    chosen = &ws.near;
  }
  return align_to_old(chosen->data(), old, shape, phy2log);
}

}  // namespace eplb
