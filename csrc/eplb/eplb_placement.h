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
  // and target copy counts `counts` ([n]; nullptr = all ones). Counts are clamped to [1, G] and
  // brought to G*S total: missing copies go one by one to the expert with the largest load per
  // copy (the reference's greedy) or, when `light`, with the smallest load per copy after the
  // addition. Kept copies stay where they are; the others are placed heaviest first on the
  // lightest GPU that may take them.
  void build(const int* slots, const int* counts, bool light = false);

  // Sets the placement to `slots` ([G*S], complete and duplicate-free), counts following it.
  void restore(const std::vector<int>& slots);

  // Local search: moves that take load off the heaviest GPU (swaps between GPUs, moving a copy
  // from one expert to another) until none strictly lowers it. Never creates duplicates.
  void improve();

  // Iterated local search from the current placement: up to `rounds` times, a few random moves
  // and improve(); a result is kept when lighter than the best so far. Stops early once the
  // heaviest GPU is at most `target`. Deterministic for a given seed.
  void perturb(double target, int rounds, uint64_t seed);

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

  void set_counts(const int* counts, bool light);
  double gpu_load(int g) const;
  void drop_excess_copies(std::vector<int>& kept);
  void fill_missing(const std::vector<int>& kept);
  int make_room(int e, std::vector<int>& room);
  void index_holders();
  double holder_max_except(int e, int g) const;
  double holders_after(int e, int skip, double delta, int other, double other_delta) const;
  bool best_move(int g, Move& move);
  void apply(const Move& move);
  bool random_move(uint64_t& rng);
  bool apply_if_below(const Move& move, double bound);

  const double* w_ = nullptr;
  int n_ = 0, G_ = 0, S_ = 0;
  std::vector<int> slot_, cnt_;
  std::vector<double> q_, load_;  // per-copy load w/cnt; per-GPU load
  std::vector<unsigned char> has_;
  // GPUs holding each expert: holder_[holder_start_[e] .. holder_start_[e + 1]); the two largest
  // loads among them and the GPU of the largest.
  std::vector<int> holder_start_, holder_, fill_, top1_gpu_;
  std::vector<double> top1_, top2_;
  std::vector<int> touched_, by_load_;
};

}  // namespace eplb
