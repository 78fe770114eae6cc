#include "eplb_balanced.h"

#include <algorithm>
#include <cassert>

#include "eplb_align.h"

namespace eplb {
namespace {

// Perturbation rounds for a node that misses its target: about kPerturbSlots / (slots of the
// node) rounds, within [kMinRounds, kMaxRounds]. Only a node whose DeepSeek placement repeats an
// expert can miss it, and the search stops as soon as the target is met; where no duplicate-free
// placement can meet it, this bounds the time (tens of milliseconds at most).
constexpr int kPerturbSlots = 200000, kMinRounds = 200, kMaxRounds = 5000;
// The search from an old placement only competes on moving fewer experts; a short one suffices.
constexpr int kOldRounds = kMinRounds;

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

// Every slot used and every expert placed.
bool is_complete(const int64_t* phy2log, const Shape& shape, std::vector<int64_t>& count) {
  count.assign(shape.num_experts, 0);
  for (int64_t p = 0; p < shape.num_replicas; ++p) {
    if (phy2log[p] < 0) return false;
    count[phy2log[p]] += 1;
  }
  return std::find(count.begin(), count.end(), 0) == count.end();
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

// Places every node of the layout in ws, keeping per node the lightest of several local-search
// runs: from `start` ([R], -1 = empty) with its copy counts; and, where `start` repeats an expert
// on a GPU, from `start` with one copy less per repeat (merging the repeat instead of moving it)
// and, when `from_scratch`, from empty GPUs with greedy counts. A node still heavier than
// `target` then gets up to `max_rounds` rounds of perturbation. Writes the placement to `out`
// ([R]); returns its heaviest GPU load.
double solve_nodes(const double* weight, const Shape& shape, const int64_t* start,
                   bool from_scratch, double target, int max_rounds, std::vector<int64_t>& out,
                   BalancedWorkspace& ws) {
  const int N = static_cast<int>(shape.num_nodes);
  const int n = static_cast<int>(shape.num_experts / N);
  const int G = static_cast<int>(shape.num_gpus / N);
  const int S = static_cast<int>(shape.num_replicas / shape.num_gpus);
  const int phy_per_node = G * S;
  NodePlacement& placement = ws.placement;
  out.resize(shape.num_replicas);
  ws.node_weight.resize(n);
  ws.start.resize(phy_per_node);
  ws.copies.resize(n);
  ws.holders.resize(n);
  ws.last_gpu.resize(n);
  ws.empty.assign(phy_per_node, -1);
  double heaviest = 0.0;
  for (int node = 0; node < N; ++node) {
    const int64_t* experts = ws.node_experts.data() + static_cast<int64_t>(node) * n;
    for (int i = 0; i < n; ++i) ws.node_weight[i] = weight[experts[i]];
    std::fill(ws.copies.begin(), ws.copies.end(), 0);
    std::fill(ws.holders.begin(), ws.holders.end(), 0);
    std::fill(ws.last_gpu.begin(), ws.last_gpu.end(), -1);
    for (int k = 0; k < phy_per_node; ++k) {
      const int64_t e = start[static_cast<int64_t>(node) * phy_per_node + k];
      const int i = e < 0 ? -1 : ws.local_of[e];
      ws.start[k] = i;
      if (i < 0) continue;
      ws.copies[i] += 1;
      if (ws.last_gpu[i] != k / S) ws.holders[i] += 1;  // a GPU's slots are contiguous
      ws.last_gpu[i] = k / S;
    }
    placement.reset(ws.node_weight.data(), n, G, S);
    double best = 0.0;
    bool have = false;
    auto run = [&](const int* slots, const int* counts, bool light = false) {
      placement.build(slots, counts, light);
      placement.improve();
      if (!have || placement.max_load() < best) {
        best = placement.max_load();
        ws.best_slots = placement.slots();
        have = true;
      }
    };
    run(ws.start.data(), ws.copies.data());
    if (ws.holders != ws.copies) run(ws.start.data(), ws.holders.data(), true);
    if (from_scratch && ws.holders != ws.copies) run(ws.empty.data(), nullptr);
    if (best > target) {
      placement.restore(ws.best_slots);
      const int rounds = std::clamp(kPerturbSlots / phy_per_node, kMinRounds, max_rounds);
      placement.perturb(target, rounds, 0x5eed + node);
      if (placement.max_load() < best) {
        best = placement.max_load();
        ws.best_slots = placement.slots();
      }
    }
    for (int k = 0; k < phy_per_node; ++k) {
      out[static_cast<int64_t>(node) * phy_per_node + k] = experts[ws.best_slots[k]];
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
  const double reference = max_gpu_load(weight, deepseek, shape, ws.count);
  double best = solve_nodes(weight, shape, deepseek, /*from_scratch=*/true, reference,
                            kMaxRounds, ws.fresh, ws);
  // Where DeepSeek's own placement is duplicate-free and ours is not clearly better, keep it:
  // then even the last bit of every balance metric is the reference's.
  if (!has_duplicate(deepseek, shape) && !(best < reference * (1.0 - 1e-12))) {
    ws.fresh.assign(deepseek, deepseek + R);
    best = reference;
  }
  if (old == nullptr) {
    std::copy(ws.fresh.begin(), ws.fresh.end(), phy2log);
    return 0;
  }
  // A placement grown from the old one moves fewer experts; it competes if it balances as well.
  // As with DeepSeek's placement, an old placement that the search cannot clearly improve is
  // kept as it is. Of the candidates, the one that changes fewer slots wins.
  int64_t changed = align_to_old(ws.fresh.data(), old, weight, shape, phy2log);
  if (read_node_layout(old, shape, ws)) {
    double near = solve_nodes(weight, shape, old, /*from_scratch=*/false, best,
                              kOldRounds, ws.near, ws);
    if (is_complete(old, shape, ws.count) && !has_duplicate(old, shape)) {
      const double as_is = max_gpu_load(weight, old, shape, ws.count);
      if (!(near < as_is * (1.0 - 1e-12))) {
        ws.near.assign(old, old + R);
        near = as_is;
      }
    }
    if (near <= best) {
      ws.aligned.resize(R);
      const int64_t near_changed =
          align_to_old(ws.near.data(), old, weight, shape, ws.aligned.data());
      if (near_changed <= changed) {
        std::copy(ws.aligned.begin(), ws.aligned.end(), phy2log);
        changed = near_changed;
      }
    }
  }
  return changed;
}

}  // namespace eplb
