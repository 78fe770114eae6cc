#include "eplb_placement.h"

#include <algorithm>
#include <limits>
#include <numeric>

namespace eplb {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

struct PerCopy {
  double load;
  int expert;
};

// Max-heap order: largest load per copy on top, ties to the lowest expert (as the reference).
bool lighter(const PerCopy& a, const PerCopy& b) {
  return a.load < b.load || (a.load == b.load && a.expert > b.expert);
}

// splitmix64: a small, fast, well-mixed generator; the search must be reproducible.
uint64_t next_random(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

void NodePlacement::reset(const double* w, int n, int G, int S) {
  w_ = w;
  n_ = n;
  G_ = G;
  S_ = S;
  cnt_.assign(n, 1);
  q_.assign(n, 0.0);
  load_.assign(G, 0.0);
  has_.assign(static_cast<std::size_t>(G) * n, 0);
}

void NodePlacement::set_counts(const int* counts, bool light) {
  int64_t total = 0;
  for (int e = 0; e < n_; ++e) {
    cnt_[e] = counts ? std::clamp(counts[e], 1, G_) : 1;
    total += cnt_[e];
  }
  const int64_t target = static_cast<int64_t>(G_) * S_;
  // Too many copies (only when missing experts were raised to one): drop the copy whose removal
  // raises its expert's per-copy load the least.
  for (; total > target; --total) {
    int best = -1;
    for (int e = 0; e < n_; ++e) {
      if (cnt_[e] >= 2 && (best < 0 || w_[e] / (cnt_[e] - 1) < w_[best] / (cnt_[best] - 1))) {
        best = e;
      }
    }
    cnt_[best] -= 1;
  }
  // Too few: copies one by one, at most one per GPU, to the expert whose copies would then be
  // the lightest (`light`) or, as the reference's greedy does, whose copies are the heaviest now.
  if (light) {
    for (; total < target; ++total) {
      int best = -1;
      for (int e = 0; e < n_; ++e) {
        if (cnt_[e] < G_ && (best < 0 || w_[e] / (cnt_[e] + 1) < w_[best] / (cnt_[best] + 1))) {
          best = e;
        }
      }
      cnt_[best] += 1;
    }
  } else {
    std::vector<PerCopy> heap;
    for (int e = 0; e < n_; ++e) {
      if (cnt_[e] < G_) heap.push_back({w_[e] / cnt_[e], e});
    }
    std::make_heap(heap.begin(), heap.end(), lighter);
    for (; total < target; ++total) {
      std::pop_heap(heap.begin(), heap.end(), lighter);
      const int e = heap.back().expert;
      cnt_[e] += 1;
      if (cnt_[e] < G_) {
        heap.back().load = w_[e] / cnt_[e];
        std::push_heap(heap.begin(), heap.end(), lighter);
      } else {
        heap.pop_back();
      }
    }
  }
  for (int e = 0; e < n_; ++e) q_[e] = w_[e] / cnt_[e];
}

double NodePlacement::gpu_load(int g) const {
  double sum = 0.0;
  for (int s = 0; s < S_; ++s) {
    const int e = at(g, s);
    if (e >= 0) sum += q_[e];
  }
  return sum;
}

double NodePlacement::max_load() const { return *std::max_element(load_.begin(), load_.end()); }

void NodePlacement::build(const int* slots, const int* counts, bool light) {
  set_counts(counts, light);
  slot_.assign(slots, slots + static_cast<std::size_t>(G_) * S_);
  std::fill(has_.begin(), has_.end(), 0);
  std::vector<int> kept(n_, 0);
  for (int g = 0; g < G_; ++g) {
    for (int s = 0; s < S_; ++s) {
      const int e = at(g, s);
      if (e < 0) continue;
      if (has(g, e)) {
        at(g, s) = -1;
        continue;
      }
      set_has(g, e, true);
      kept[e] += 1;
    }
  }
  for (int g = 0; g < G_; ++g) load_[g] = gpu_load(g);
  drop_excess_copies(kept);
  fill_missing(kept);
  for (int g = 0; g < G_; ++g) load_[g] = gpu_load(g);
}

void NodePlacement::drop_excess_copies(std::vector<int>& kept) {
  for (int e = 0; e < n_; ++e) {
    for (; kept[e] > cnt_[e]; --kept[e]) {
      int worst = -1;  // heaviest GPU holding e
      for (int g = 0; g < G_; ++g) {
        if (has(g, e) && (worst < 0 || load_[g] > load_[worst])) worst = g;
      }
      for (int s = 0; s < S_; ++s) {
        if (at(worst, s) == e) at(worst, s) = -1;
      }
      set_has(worst, e, false);
      load_[worst] -= q_[e];
    }
  }
}

void NodePlacement::fill_missing(const std::vector<int>& kept) {
  std::vector<int> missing;
  for (int e = 0; e < n_; ++e) missing.insert(missing.end(), cnt_[e] - kept[e], e);
  std::stable_sort(missing.begin(), missing.end(), [this](int a, int b) { return q_[a] > q_[b]; });
  std::vector<int> room(G_, 0);
  for (int g = 0; g < G_; ++g) {
    for (int s = 0; s < S_; ++s) room[g] += at(g, s) < 0;
  }
  for (int e : missing) {
    int best = -1;
    for (int g = 0; g < G_; ++g) {
      if (room[g] > 0 && !has(g, e) && (best < 0 || load_[g] < load_[best])) best = g;
    }
    if (best < 0) best = make_room(e, room);
    int s = 0;
    while (at(best, s) >= 0) ++s;
    at(best, s) = e;
    set_has(best, e, true);
    room[best] -= 1;
    load_[best] += q_[e];
  }
}

// Every GPU with a free slot already holds e. Then the lightest GPU g without e is full, and as a
// GPU h with a free slot holds fewer distinct experts than g, some expert x of g is not on h:
// moving x to h frees a slot on g that e may take.
int NodePlacement::make_room(int e, std::vector<int>& room) {
  int h = 0;
  while (room[h] == 0) ++h;
  int g = -1;
  for (int k = 0; k < G_; ++k) {
    if (!has(k, e) && (g < 0 || load_[k] < load_[g])) g = k;
  }
  int s = 0;
  while (has(h, at(g, s))) ++s;
  const int x = at(g, s);
  int t = 0;
  while (at(h, t) >= 0) ++t;
  at(h, t) = x;
  set_has(h, x, true);
  room[h] -= 1;
  load_[h] += q_[x];
  at(g, s) = -1;
  set_has(g, x, false);
  room[g] += 1;
  load_[g] -= q_[x];
  return g;
}

void NodePlacement::index_holders() {
  holder_start_.resize(n_ + 1);
  holder_start_[0] = 0;
  for (int e = 0; e < n_; ++e) holder_start_[e + 1] = holder_start_[e] + cnt_[e];
  holder_.resize(holder_start_[n_]);
  fill_.assign(holder_start_.begin(), holder_start_.end() - 1);
  top1_.assign(n_, -kInf);
  top2_.assign(n_, -kInf);
  top1_gpu_.assign(n_, -1);
  for (int g = 0; g < G_; ++g) {
    const double l = load_[g];
    for (int s = 0; s < S_; ++s) {
      const int e = at(g, s);
      holder_[fill_[e]++] = g;
      if (l > top1_[e]) {
        top2_[e] = top1_[e];
        top1_[e] = l;
        top1_gpu_[e] = g;
      } else if (l > top2_[e]) {
        top2_[e] = l;
      }
    }
  }
}

double NodePlacement::holder_max_except(int e, int g) const {
  return top1_gpu_[e] == g ? top2_[e] : top1_[e];
}

// Heaviest new load among the holders of `e` other than `skip`, when e's copies change by `delta`
// each and those holding `other` also change by `other_delta`.
double NodePlacement::holders_after(int e, int skip, double delta, int other,
                                    double other_delta) const {
  double top = -kInf;
  for (int k = holder_start_[e]; k < holder_start_[e + 1]; ++k) {
    const int x = holder_[k];
    if (x == skip) continue;
    top = std::max(top, load_[x] + delta + (has(x, other) ? other_delta : 0.0));
  }
  return top;
}

// The move that leaves the lowest maximum over the GPUs it makes heavier (and g), if that is
// below g's load. Every such load is evaluated exactly.
bool NodePlacement::best_move(int g, Move& move) {
  const double M = load_[g];
  double best = M;
  bool found = false;
  auto consider = [&](double value, const Move& m) {
    if (value < best) {
      best = value;
      move = m;
      found = true;
    }
  };

  // Swap a copy on g with a lighter copy on another GPU h. Moving d from g to h leaves
  // max(M - d, l_h + d) >= (M + l_h) / 2, so going through lighter GPUs first, stop once that
  // bound is no better than the best swap found.
  for (int h : by_load_) {
    const double lh = load_[h];
    if (0.5 * (M + lh) >= best) break;
    if (h == g) continue;
    for (int s = 0; s < S_; ++s) {
      const int a = at(g, s);
      if (has(h, a)) continue;
      const double qa = q_[a];
      for (int t = 0; t < S_; ++t) {
        const int b = at(h, t);
        const double d = qa - q_[b];
        if (d <= 0.0) continue;
        const double value = std::max(M - d, lh + d);
        if (value < best && !has(g, b)) consider(value, {MoveKind::kSwap, g, s, h, t, a, b});
      }
    }
  }

  // Copy counts change only when no swap helps: swaps are cheaper to find and almost always
  // the better move.
  if (found) return true;
  index_holders();

  // Turn a copy on g of a replicated expert a into one more copy of an expert b not on g: the
  // other holders of a get heavier, the holders of b lighter.
  for (int s = 0; s < S_; ++s) {
    const int a = at(g, s);
    if (cnt_[a] < 2) continue;
    const double rise = w_[a] / (cnt_[a] - 1) - q_[a];
    const double others_at_most = holder_max_except(a, g) + rise;
    for (int b = 0; b < n_; ++b) {
      if (cnt_[b] >= G_ || has(g, b)) continue;
      const double qb_new = w_[b] / (cnt_[b] + 1);
      const double g_new = M - q_[a] + qb_new;
      // The holders of a end between others_at_most - (the drop of b) and others_at_most.
      if (std::max(g_new, others_at_most + (qb_new - q_[b])) >= best) continue;
      const double others = holders_after(a, g, rise, b, qb_new - q_[b]);
      consider(std::max(g_new, others), {MoveKind::kTransfer, g, s, -1, -1, a, b});
    }
  }

  // Give an expert a of g one more copy on a GPU h without it, in place of a copy there of a
  // replicated expert b: the holders of a get lighter, h and the other holders of b heavier.
  for (int s = 0; s < S_; ++s) {
    const int a = at(g, s);
    if (cnt_[a] >= G_) continue;
    const double qa_new = w_[a] / (cnt_[a] + 1);
    const double drop = qa_new - q_[a];
    if (M + drop >= best) continue;
    for (int h = 0; h < G_; ++h) {
      if (has(h, a)) continue;
      for (int t = 0; t < S_; ++t) {
        const int b = at(h, t);
        if (cnt_[b] < 2) continue;
        const double h_new = load_[h] - q_[b] + qa_new;
        if (h_new >= best) continue;
        const double rise = w_[b] / (cnt_[b] - 1) - q_[b];
        const double g_new = M + drop + (has(g, b) ? rise : 0.0);
        if (std::max(g_new, holder_max_except(b, h) + rise + drop) >= best) continue;
        const double others = holders_after(b, h, rise, a, drop);
        consider(std::max({g_new, h_new, others}), {MoveKind::kTransfer, h, t, -1, -1, b, a});
      }
    }
  }
  return found;
}

void NodePlacement::apply(const Move& m) {
  if (m.kind == MoveKind::kSwap) {
    const int a = at(m.g, m.s), b = at(m.h, m.t);
    at(m.g, m.s) = b;
    at(m.h, m.t) = a;
    set_has(m.g, a, false);
    set_has(m.g, b, true);
    set_has(m.h, b, false);
    set_has(m.h, a, true);
    return;
  }
  at(m.g, m.s) = m.to;
  set_has(m.g, m.from, false);
  set_has(m.g, m.to, true);
  cnt_[m.from] -= 1;
  cnt_[m.to] += 1;
  q_[m.from] = w_[m.from] / cnt_[m.from];
  q_[m.to] = w_[m.to] / cnt_[m.to];
}

// Applies the move and keeps it if every GPU it changed ends strictly below `bound` (loads are
// recomputed from scratch, so rounding can never let the search cycle).
bool NodePlacement::apply_if_below(const Move& m, double bound) {
  touched_.clear();
  if (m.kind == MoveKind::kSwap) {
    touched_ = {m.g, m.h};
  } else {
    for (int g = 0; g < G_; ++g) {
      if (g == m.g || has(g, m.from) || has(g, m.to)) touched_.push_back(g);
    }
  }
  apply(m);
  bool below = true;
  for (int g : touched_) {
    load_[g] = gpu_load(g);
    below = below && load_[g] < bound;
  }
  if (below) return true;
  Move inverse = m;
  std::swap(inverse.from, inverse.to);
  apply(inverse);
  for (int g : touched_) load_[g] = gpu_load(g);
  return false;
}

void NodePlacement::improve() {
  // by_load_ lists the GPUs by ascending load (ties by index); a move changes few loads, so an
  // insertion sort restores the order in about G steps.
  by_load_.resize(G_);
  std::iota(by_load_.begin(), by_load_.end(), 0);
  auto lighter_gpu = [this](int x, int y) {
    return load_[x] < load_[y] || (load_[x] == load_[y] && x < y);
  };
  // Each accepted move lowers the sorted load vector lexicographically, so the search ends; the
  // cap only bounds the time spent on long chains of tiny improvements.
  const int max_moves = 8 * G_ * S_ + 64;
  for (int it = 0; it < max_moves; ++it) {
    for (int i = 1; i < G_; ++i) {
      const int x = by_load_[i];
      int j = i;
      for (; j > 0 && lighter_gpu(x, by_load_[j - 1]); --j) by_load_[j] = by_load_[j - 1];
      by_load_[j] = x;
    }
    const int g = by_load_.back();
    Move move;
    if (!best_move(g, move) || !apply_if_below(move, load_[g])) break;
  }
}

// One random duplicate-free move: a swap between two GPUs or a copy handed from one expert to
// another. False when the drawn move is not allowed.
bool NodePlacement::random_move(uint64_t& rng) {
  const int g = static_cast<int>(next_random(rng) % G_);
  const int s = static_cast<int>(next_random(rng) % S_);
  const int a = at(g, s);
  if (next_random(rng) % 2 == 0) {
    const int h = static_cast<int>(next_random(rng) % G_);
    const int t = static_cast<int>(next_random(rng) % S_);
    const int b = at(h, t);
    if (h == g || has(h, a) || has(g, b)) return false;
    apply({MoveKind::kSwap, g, s, h, t, a, b});
  } else {
    const int b = static_cast<int>(next_random(rng) % n_);
    if (cnt_[a] < 2 || cnt_[b] >= G_ || has(g, b)) return false;
    apply({MoveKind::kTransfer, g, s, -1, -1, a, b});
  }
  return true;
}

void NodePlacement::restore(const std::vector<int>& slots) {
  slot_ = slots;
  std::fill(cnt_.begin(), cnt_.end(), 0);
  std::fill(has_.begin(), has_.end(), 0);
  for (int g = 0; g < G_; ++g) {
    for (int s = 0; s < S_; ++s) {
      cnt_[at(g, s)] += 1;
      set_has(g, at(g, s), true);
    }
  }
  for (int e = 0; e < n_; ++e) q_[e] = w_[e] / cnt_[e];
  for (int g = 0; g < G_; ++g) load_[g] = gpu_load(g);
}

void NodePlacement::perturb(double target, int rounds, uint64_t seed) {
  std::vector<int> best = slot_;
  double best_max = max_load();
  uint64_t rng = seed;
  for (int round = 0; round < rounds && best_max > target; ++round) {
    const int kicks = 1 + static_cast<int>(next_random(rng) % 3);
    for (int k = 0, tries = 0; k < kicks && tries < 16 * kicks; ++tries) k += random_move(rng);
    for (int g = 0; g < G_; ++g) load_[g] = gpu_load(g);
    improve();
    if (max_load() < best_max) {
      best_max = max_load();
      best = slot_;
    } else {
      restore(best);
    }
  }
  restore(best);
}

}  // namespace eplb
