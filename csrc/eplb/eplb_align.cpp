#include "eplb_align.h"

#include <algorithm>
#include <cstddef>
#include <limits>

namespace eplb {

std::vector<int> max_weight_assignment(const std::vector<int64_t>& weight, int n) {
  // Minimum-cost assignment on cost = -weight. Rows are added one at a time; each addition grows
  // a shortest augmenting path (Dijkstra on reduced costs) from the new row to a free column.
  // Index 0 is a virtual column, so rows and columns are 1-based here.
  constexpr int64_t kInf = std::numeric_limits<int64_t>::max() / 4;
  std::vector<int64_t> u(n + 1, 0), v(n + 1, 0), min_slack(n + 1);
  std::vector<int> row_of(n + 1, 0), prev_col(n + 1, 0);
  std::vector<char> visited(n + 1);
  for (int row = 1; row <= n; ++row) {
    row_of[0] = row;
    int col = 0;
    std::fill(min_slack.begin(), min_slack.end(), kInf);
    std::fill(visited.begin(), visited.end(), 0);
    do {
      visited[col] = 1;
      const int r = row_of[col];
      int64_t delta = kInf;
      int next = 0;
      for (int j = 1; j <= n; ++j) {
        if (visited[j]) continue;
        const int64_t cost = -weight[static_cast<std::size_t>(r - 1) * n + (j - 1)];
        const int64_t reduced = cost - u[r] - v[j];
        if (reduced < min_slack[j]) {
          min_slack[j] = reduced;
          prev_col[j] = col;
        }
        if (min_slack[j] < delta) {
          delta = min_slack[j];
          next = j;
        }
      }
      for (int j = 0; j <= n; ++j) {
        if (visited[j]) {
          u[row_of[j]] += delta;
          v[j] -= delta;
        } else {
          min_slack[j] -= delta;
        }
      }
      col = next;
    } while (row_of[col] != 0);
    while (col != 0) {  // flip the augmenting path
      const int before = prev_col[col];
      row_of[col] = row_of[before];
      col = before;
    }
  }
  std::vector<int> assigned(n);
  for (int j = 1; j <= n; ++j) assigned[row_of[j] - 1] = j - 1;
  return assigned;
}

namespace {

// Swaps pairs of copies between GPUs of one node when that puts back more experts into their
// old slots than it takes out, and no GPU gets heavier than the heaviest one is now (copy counts,
// hence the mean load, do not change). Returns the slots of `out` that still differ from `old`.
int64_t restore_old_slots(const int64_t* old, const double* weight, const Shape& shape,
                          int64_t* out) {
  const int64_t E = shape.num_experts, R = shape.num_replicas;
  const int G = static_cast<int>(shape.num_gpus);
  const int S = static_cast<int>(R / G);
  const int Gn = G / static_cast<int>(shape.num_nodes);
  std::vector<int64_t> count(E, 0);
  for (int64_t p = 0; p < R; ++p) count[out[p]] += 1;
  std::vector<double> q(E), load(G, 0.0);
  for (int64_t e = 0; e < E; ++e) q[e] = count[e] ? weight[e] / count[e] : 0.0;
  std::vector<char> has(static_cast<std::size_t>(G) * E, 0);
  auto gpu_load = [&](int g) {
    double sum = 0.0;
    for (int s = 0; s < S; ++s) sum += q[out[static_cast<int64_t>(g) * S + s]];
    return sum;
  };
  for (int g = 0; g < G; ++g) {
    load[g] = gpu_load(g);
    for (int s = 0; s < S; ++s) has[static_cast<std::size_t>(g) * E + out[g * S + s]] = 1;
  }
  const double heaviest = *std::max_element(load.begin(), load.end());
  // A GPU may end at most at its own load or clearly below the heaviest (rounding must not make
  // a balance metric a last bit worse).
  const double cap = heaviest * (1.0 - 1e-12);
  auto fits = [&](int g, double before) { return load[g] <= before || load[g] <= cap; };

  for (bool improved = true; improved;) {
    improved = false;
    for (int64_t p = 0; p < R; ++p) {
      const int64_t y = old[p], x = out[p];
      const int a = static_cast<int>(p / S);
      if (y < 0 || x == y || has[static_cast<std::size_t>(a) * E + y]) continue;
      for (int b = a - a % Gn; b < a - a % Gn + Gn; ++b) {
        if (b == a || !has[static_cast<std::size_t>(b) * E + y] ||
            has[static_cast<std::size_t>(b) * E + x]) {
          continue;
        }
        int64_t r = static_cast<int64_t>(b) * S;
        while (out[r] != y) ++r;
        if (old[r] == y) continue;  // would only move the loss to slot r
        const double before_a = load[a], before_b = load[b];
        std::swap(out[p], out[r]);
        load[a] = gpu_load(a);
        load[b] = gpu_load(b);
        if (!fits(a, before_a) || !fits(b, before_b)) {
          std::swap(out[p], out[r]);
          load[a] = before_a;
          load[b] = before_b;
          continue;
        }
        has[static_cast<std::size_t>(a) * E + x] = 0;
        has[static_cast<std::size_t>(a) * E + y] = 1;
        has[static_cast<std::size_t>(b) * E + y] = 0;
        has[static_cast<std::size_t>(b) * E + x] = 1;
        improved = true;
        break;
      }
    }
  }
  int64_t changed = 0;
  for (int64_t p = 0; p < R; ++p) changed += out[p] != old[p];
  return changed;
}

}  // namespace

int64_t align_to_old(const int64_t* placement, const int64_t* old, const double* weight,
                     const Shape& shape, int64_t* out) {
  const int64_t E = shape.num_experts, R = shape.num_replicas;
  const int G = static_cast<int>(shape.num_gpus);
  const int N = static_cast<int>(shape.num_nodes);
  const int S = static_cast<int>(R / G);
  const int Gn = G / N;

  // old_gpus[start[e] .. start[e+1]): the distinct old GPUs holding e (slots of one GPU are
  // contiguous, so a repeat is always the entry just written).
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t p = 0; p < R; ++p) {
    if (old[p] >= 0) start[old[p] + 1] += 1;
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int> old_gpus(start[E]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < R; ++p) {
    const int64_t e = old[p];
    const int b = static_cast<int>(p / S);
    if (e >= 0 && (fill[e] == start[e] || old_gpus[fill[e] - 1] != b)) old_gpus[fill[e]++] = b;
  }
  // overlap[a * G + b]: experts of new GPU a that old GPU b holds.
  std::vector<int64_t> overlap(static_cast<std::size_t>(G) * G, 0);
  for (int64_t p = 0; p < R; ++p) {
    const int64_t e = placement[p];
    const int a = static_cast<int>(p / S);
    for (int64_t k = start[e]; k < fill[e]; ++k) {
      overlap[static_cast<std::size_t>(a) * G + old_gpus[k]] += 1;
    }
  }

  // position[a]: the old GPU whose place new GPU a takes. Nodes move as units, so first match
  // GPUs for every (new node, old node) pair, then nodes by the value of those matchings.
  std::vector<int> position(G);
  std::vector<std::vector<int>> inner(static_cast<std::size_t>(N) * N);
  std::vector<int64_t> node_value(static_cast<std::size_t>(N) * N, 0);
  std::vector<int64_t> sub(static_cast<std::size_t>(Gn) * Gn);
  for (int na = 0; na < N; ++na) {
    for (int nb = 0; nb < N; ++nb) {
      for (int i = 0; i < Gn; ++i) {
        for (int j = 0; j < Gn; ++j) {
          sub[static_cast<std::size_t>(i) * Gn + j] =
              overlap[static_cast<std::size_t>(na * Gn + i) * G + nb * Gn + j];
        }
      }
      std::vector<int>& match = inner[static_cast<std::size_t>(na) * N + nb];
      match = max_weight_assignment(sub, Gn);
      for (int i = 0; i < Gn; ++i) {
        node_value[static_cast<std::size_t>(na) * N + nb] +=
            sub[static_cast<std::size_t>(i) * Gn + match[i]];
      }
    }
  }
  const std::vector<int> node_position = max_weight_assignment(node_value, N);
  for (int na = 0; na < N; ++na) {
    const int nb = node_position[na];
    const std::vector<int>& match = inner[static_cast<std::size_t>(na) * N + nb];
    for (int i = 0; i < Gn; ++i) position[na * Gn + i] = nb * Gn + match[i];
  }

  // Inside each GPU, experts the old GPU also held keep their old slot.
  std::vector<char> placed(S);
  for (int a = 0; a < G; ++a) {
    const int64_t* mine = placement + static_cast<int64_t>(a) * S;
    const int64_t* was = old + static_cast<int64_t>(position[a]) * S;
    int64_t* dst = out + static_cast<int64_t>(position[a]) * S;
    std::fill(placed.begin(), placed.end(), 0);
    for (int s = 0; s < S; ++s) {
      dst[s] = -1;
      for (int k = 0; k < S; ++k) {
        if (!placed[k] && mine[k] == was[s]) {
          dst[s] = mine[k];
          placed[k] = 1;
          break;
        }
      }
    }
    int k = 0;
    for (int s = 0; s < S; ++s) {
      if (dst[s] >= 0) continue;
      while (placed[k]) ++k;
      dst[s] = mine[k];
      placed[k] = 1;
    }
  }
  return restore_old_slots(old, weight, shape, out);
}

}  // namespace eplb
