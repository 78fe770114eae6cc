#include "eplb_deepseek.h"

#include <algorithm>
#include <cstddef>
#include <utility>

namespace eplb {
namespace {

// Strict orders (no two packs or experts compare equal), so every heap top is unique: the
// lightest pack with ties to the lowest index (Python's `min` keeps the first of equal keys), and
// the largest per-copy load with ties to the lowest expert (torch's max returns the first).
bool before(const PackLoad& a, const PackLoad& b) {
  return a.load < b.load || (a.load == b.load && a.pack < b.pack);
}
bool before(const ReplicaLoad& a, const ReplicaLoad& b) {
  return a.per_copy > b.per_copy || (a.per_copy == b.per_copy && a.expert < b.expert);
}

// Binary heap with before() on top: restores the order after heap[0] was changed.
template <typename T>
void sift_down_top(std::vector<T>& heap) {
  const std::size_t n = heap.size();
  const T moving = heap[0];
  std::size_t i = 0;
  for (std::size_t child = 1; child < n; child = 2 * i + 1) {
    if (child + 1 < n && before(heap[child + 1], heap[child])) ++child;
    if (!before(heap[child], moving)) break;
    heap[i] = heap[child];
    i = child;
  }
  heap[i] = moving;
}

template <typename T>
void make_heap(std::vector<T>& heap) {
  std::make_heap(heap.begin(), heap.end(), [](const T& a, const T& b) { return before(b, a); });
}

// Longest-processing-time packing of n items into num_packs packs of exactly n / num_packs items.
// Items are taken in the order of the reference's `weight.sort(descending=True)`: torch's CPU sort
// is std::sort over (value, index) pairs with a greater-than comparator on the value, so running
// the same std::sort on the same sequence leaves equal weights (the copies of one expert always
// tie) in exactly its order, which a stable sort would not (tests compare against torch.sort).
void balanced_packing(const float* w, int64_t n, int64_t num_packs, int64_t* pack, int64_t* rank,
                      std::vector<std::pair<float, int64_t>>& order, std::vector<PackLoad>& heap) {
  const int64_t cap = n / num_packs;
  if (cap == 1) {
    for (int64_t i = 0; i < n; ++i) {
      pack[i] = i;
      rank[i] = 0;
    }
    return;
  }
  order.resize(n);
  for (int64_t i = 0; i < n; ++i) order[i] = {w[i], i};
  std::sort(order.begin(), order.end(),
            [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
              return a.first > b.first;
            });

  heap.clear();
  for (int64_t p = 0; p < num_packs; ++p) heap.push_back({0.0f, p, 0});
  for (const auto& [load, item] : order) {
    PackLoad& top = heap[0];
    pack[item] = top.pack;
    rank[item] = top.items;
    top.load += load;
    if (++top.items == cap) {  // full packs leave the heap for good
      top = heap.back();
      heap.pop_back();
    }
    if (!heap.empty()) sift_down_top(heap);
  }
}

// Give num_phy - n extra copies, each to the expert with the largest load per copy.
void replicate_experts(const float* w, int64_t n, int64_t num_phy, int64_t* phy2log,
                       int64_t* rank, int64_t* cnt, std::vector<ReplicaLoad>& heap) {
  heap.resize(n);
  for (int64_t e = 0; e < n; ++e) {
    phy2log[e] = e;
    rank[e] = 0;
    cnt[e] = 1;
    heap[e] = {w[e], e};
  }
  make_heap(heap);
  for (int64_t p = n; p < num_phy; ++p) {
    const int64_t e = heap[0].expert;
    phy2log[p] = e;
    rank[p] = cnt[e];
    cnt[e] += 1;
    heap[0].per_copy = w[e] / static_cast<float>(cnt[e]);
    sift_down_top(heap);
  }
}

}  // namespace

void deepseek_layer(const float* weight, const float* group_load, const Shape& shape,
                    int64_t* phy2log, int64_t* phyrank, int64_t* logcnt, DeepseekWorkspace& ws) {
  const int64_t E = shape.num_experts;
  const int64_t group_size = E / shape.num_groups;
  const int64_t groups_per_node = shape.num_groups / shape.num_nodes;
  const int64_t experts_per_node = E / shape.num_nodes;
  const int64_t phy_per_node = shape.num_replicas / shape.num_nodes;
  const int64_t gpus_per_node = shape.num_gpus / shape.num_nodes;
  const int64_t phy_per_gpu = shape.num_replicas / shape.num_gpus;

  // Step 1: groups to nodes; "mlog" numbers experts node by node.
  ws.pack.resize(std::max(shape.num_groups, phy_per_node));
  ws.rank.resize(ws.pack.size());
  balanced_packing(group_load, shape.num_groups, shape.num_nodes, ws.pack.data(), ws.rank.data(),
                   ws.order, ws.pack_heap);
  ws.log2mlog.resize(E);
  ws.mlog2log.resize(E);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t g = e / group_size;
    const int64_t m = (ws.pack[g] * groups_per_node + ws.rank[g]) * group_size + e % group_size;
    ws.log2mlog[e] = m;
    ws.mlog2log[m] = e;
  }

  ws.node_weight.resize(experts_per_node);
  ws.phy_weight.resize(phy_per_node);
  ws.phy2mlog.resize(phy_per_node);
  ws.phyrank.resize(phy_per_node);
  ws.mlogcnt.resize(experts_per_node);
  for (int64_t node = 0; node < shape.num_nodes; ++node) {
    const int64_t* node_log = ws.mlog2log.data() + node * experts_per_node;
    for (int64_t i = 0; i < experts_per_node; ++i) ws.node_weight[i] = weight[node_log[i]];

    // Step 2: replicate within the node.
    replicate_experts(ws.node_weight.data(), experts_per_node, phy_per_node, ws.phy2mlog.data(),
                      ws.phyrank.data(), ws.mlogcnt.data(), ws.replica_heap);

    // Step 3: pack the node's physical experts to its GPUs.
    for (int64_t p = 0; p < phy_per_node; ++p) {
      const int64_t m = ws.phy2mlog[p];
      ws.phy_weight[p] = ws.node_weight[m] / static_cast<float>(ws.mlogcnt[m]);
    }
    balanced_packing(ws.phy_weight.data(), phy_per_node, gpus_per_node, ws.pack.data(),
                     ws.rank.data(), ws.order, ws.pack_heap);
    for (int64_t p = 0; p < phy_per_node; ++p) {
      const int64_t slot = node * phy_per_node + ws.pack[p] * phy_per_gpu + ws.rank[p];
      phy2log[slot] = node_log[ws.phy2mlog[p]];
      phyrank[slot] = ws.phyrank[p];
    }
    for (int64_t i = 0; i < experts_per_node; ++i) logcnt[node_log[i]] = ws.mlogcnt[i];
  }
}

void balanced_packing_row(const float* w, int64_t n, int64_t num_packs, int64_t* pack,
                          int64_t* rank, DeepseekWorkspace& ws) {
  balanced_packing(w, n, num_packs, pack, rank, ws.order, ws.pack_heap);
}

void replicate_experts_row(const float* w, int64_t n, int64_t num_phy, int64_t* phy2log,
                           int64_t* rank, int64_t* cnt, DeepseekWorkspace& ws) {
  replicate_experts(w, n, num_phy, phy2log, rank, cnt, ws.replica_heap);
}

}  // namespace eplb
