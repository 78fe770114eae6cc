// Duplicate-free placement of replicated experts on the GPUs of one node (the whole cluster for
// the global policy): choose copy counts and slots so that the heaviest GPU is as light as
// possible, never putting two copies of one expert on one GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace eplb {

class NodePlacement {
 public:
  // w: [n] float64 loads of the node's experts (local ids 0..n-1); G GPUs with S slots each.
  // Requires S <= n, so that a duplicate-free placement exists.
  void reset(const double* w, int n, int G, int S);

  // Starts from `slots` ([G*S] local ids, -1 = empty; repeats on one GPU are allowed and dropped)
  // and target copy counts `counts` ([n]; nullptr = greedy largest-load-per-copy replication).
  // Counts are clamped to [1, G] and brought to G*S total; kept copies stay where they are and
  // the missing ones are placed heaviest first on the lightest GPU that may take them.
  void build(const int* slots, const int* counts);

  // Local search: moves that take load off the heaviest GPU (swaps between GPUs, moving a copy
  // from one expert to another) until none strictly lowers it. Never creates duplicates.
  void improve();

  double max_load() const;
  // [G*S] local expert ids, GPU-major.
  const std::vector<int>& slots() const { return slot_; }

 private:
  // kSwap exchanges slot (g, s) with slot (h, t). kTransfer turns the copy of expert `from` in
  // slot (g, s) into a copy of expert `to`: one copy fewer of `from`, one more of `to`.
  enum class MoveKind { kSwap, kTransfer };
  struct Move {
    MoveKind kind;
    int g, s;
    int h, t;
    int from, to;
  };

  bool has(int g, int e) const { return has_[static_cast<std::size_t>(g) * n_ + e]; }
  void set_has(int g, int e, bool v) { has_[static_cast<std::size_t>(g) * n_ + e] = v; }
  int& at(int g, int s) { return slot_[static_cast<std::size_t>(g) * S_ + s]; }
  int at(int g, int s) const { return slot_[static_cast<std::size_t>(g) * S_ + s]; }

  void set_counts(const int* counts);
  double gpu_load(int g) const;
  void drop_excess_copies(std::vector<int>& kept);
  void fill_missing(const std::vector<int>& kept);
  int make_room(int e, std::vector<int>& room);
  void holder_maxima();
  double holder_max_except(int e, int g) const;
  bool best_move(int g, Move& move) const;
  void apply(const Move& move);
  bool apply_if_below(const Move& move, double bound);

  const double* w_ = nullptr;
  int n_ = 0, G_ = 0, S_ = 0;
  std::vector<int> slot_, cnt_;
  std::vector<double> q_, load_;  // per-copy load w/cnt; per-GPU load
  std::vector<unsigned char> has_;
  // Per expert: the two largest loads among GPUs holding it, and the GPU of the largest.
  std::vector<double> top1_, top2_;
  std::vector<int> top1_gpu_;
  std::vector<int> touched_;
};

}  // namespace eplb
