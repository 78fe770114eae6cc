// eplb._C: Python bindings of the CPU EPLB algorithms. Arguments are raw addresses of contiguous CPU
// tensors (`tensor.data_ptr()`) and sizes; the Python wrapper in eplb/algorithm.py validates
// them. Layers are independent and run with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

#include "common/pointers.h"
#include "eplb_balanced.h"
#include "eplb_deepseek.h"
#if defined(EPLB_WITH_CUDA)
#include "row_copy.h"
#endif

namespace py = pybind11;

namespace {

using common::address;

// Runs body(begin, end) on contiguous chunks of the layers [0, num_layers), one chunk per
// hardware thread (at most 8) when there is enough work to pay for starting threads.
template <typename Body>
void for_layer_chunks(int64_t num_layers, int64_t slots_per_layer, const Body& body) {
  constexpr int64_t kSlotsPerThread = 2048;
  const int64_t hardware = std::max(1u, std::thread::hardware_concurrency());
  const int64_t by_work = num_layers * slots_per_layer / kSlotsPerThread;
  const int64_t threads =
      std::max<int64_t>(1, std::min({hardware, int64_t{8}, num_layers, by_work}));
  std::vector<std::exception_ptr> errors(threads);
  auto run = [&](int64_t k) {
    try {
      body(num_layers * k / threads, num_layers * (k + 1) / threads);
    } catch (...) {
      errors[k] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  for (int64_t k = 1; k < threads; ++k) pool.emplace_back(run, k);
  run(0);
  for (std::thread& t : pool) t.join();
  for (const std::exception_ptr& error : errors) {
    if (error) std::rethrow_exception(error);
  }
}

void deepseek(uintptr_t weight, uintptr_t group_load, int64_t num_layers,
              const eplb::Shape& shape, uintptr_t phy2log, uintptr_t phyrank, uintptr_t logcnt) {
  py::gil_scoped_release release;
  const int64_t E = shape.num_experts, R = shape.num_replicas;
  for_layer_chunks(num_layers, R, [&](int64_t begin, int64_t end) {
    eplb::DeepseekWorkspace ws;
    for (int64_t l = begin; l < end; ++l) {
      eplb::deepseek_layer(address<const float>(weight) + l * E,
                           address<const float>(group_load) + l * shape.num_groups, shape,
                           address<int64_t>(phy2log) + l * R, address<int64_t>(phyrank) + l * R,
                           address<int64_t>(logcnt) + l * E, ws);
    }
  });
}

void balanced(uintptr_t weight, int64_t num_layers, const eplb::Shape& shape, uintptr_t deepseek,
              uintptr_t old, uintptr_t phy2log, uintptr_t num_changed) {
  py::gil_scoped_release release;
  const int64_t E = shape.num_experts, R = shape.num_replicas;
  // The local search costs far more per slot than the DeepSeek algorithm.
  for_layer_chunks(num_layers, 16 * R, [&](int64_t begin, int64_t end) {
    eplb::BalancedWorkspace ws;
    for (int64_t l = begin; l < end; ++l) {
      const int64_t changed = eplb::balanced_layer(
          address<const double>(weight) + l * E, shape, address<const int64_t>(deepseek) + l * R,
          old ? address<const int64_t>(old) + l * R : nullptr, address<int64_t>(phy2log) + l * R,
          ws);
      if (num_changed) address<int64_t>(num_changed)[l] = changed;
    }
  });
}

// log2phy[l, e, r] = the slot holding copy r of expert e; -1 where there is none. Returns false
// (leaving `out` partly written) when a used slot has an expert id >= num_experts, a rank
// outside [0, maxcnt), or the same (expert, rank) as another slot.
bool log2phy(uintptr_t phy2log, uintptr_t phyrank, int64_t num_layers, int64_t num_replicas,
             int64_t num_experts, int64_t maxcnt, uintptr_t out) {
  py::gil_scoped_release release;
  const int64_t* p2l = address<const int64_t>(phy2log);
  const int64_t* rank = address<const int64_t>(phyrank);
  int64_t* dst = address<int64_t>(out);
  std::fill(dst, dst + num_layers * num_experts * maxcnt, int64_t{-1});
  for (int64_t l = 0; l < num_layers; ++l) {
    for (int64_t p = 0; p < num_replicas; ++p) {
      const int64_t e = p2l[l * num_replicas + p], r = rank[l * num_replicas + p];
      if (e < 0) continue;
      if (e >= num_experts || r < 0 || r >= maxcnt) return false;
      int64_t& entry = dst[(l * num_experts + e) * maxcnt + r];
      if (entry >= 0) return false;  // two slots claim the same copy of one expert
      entry = p;
    }
  }
  return true;
}

void packing(uintptr_t weight, int64_t rows, int64_t n, int64_t num_packs, uintptr_t pack,
             uintptr_t rank) {
  common::require(num_packs > 0 && n % num_packs == 0, "num_packs must divide the items");
  py::gil_scoped_release release;
  eplb::DeepseekWorkspace ws;
  for (int64_t i = 0; i < rows; ++i) {
    eplb::balanced_packing_row(address<const float>(weight) + i * n, n, num_packs,
                               address<int64_t>(pack) + i * n, address<int64_t>(rank) + i * n, ws);
  }
}

void replicate(uintptr_t weight, int64_t rows, int64_t n, int64_t num_phy, uintptr_t phy2log,
               uintptr_t rank, uintptr_t cnt) {
  common::require(num_phy >= n, "num_phy must be at least the number of experts");
  py::gil_scoped_release release;
  eplb::DeepseekWorkspace ws;
  for (int64_t i = 0; i < rows; ++i) {
    eplb::replicate_experts_row(address<const float>(weight) + i * n, n, num_phy,
                                address<int64_t>(phy2log) + i * num_phy,
                                address<int64_t>(rank) + i * num_phy, address<int64_t>(cnt) + i * n,
                                ws);
  }
}

eplb::Shape make_shape(int64_t num_experts, int64_t num_replicas, int64_t num_groups,
                       int64_t num_nodes, int64_t num_gpus) {
  return {num_experts, num_replicas, num_groups, num_nodes, num_gpus};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "eplb native extension: the CPU EPLB algorithms (and, in CUDA builds, row copies)";
  m.def(
      "eplb_deepseek",
      [](uintptr_t weight, uintptr_t group_load, int64_t num_layers, int64_t num_experts,
         int64_t num_replicas, int64_t num_groups, int64_t num_nodes, int64_t num_gpus,
         uintptr_t phy2log, uintptr_t phyrank, uintptr_t logcnt) {
        deepseek(weight, group_load, num_layers,
                 make_shape(num_experts, num_replicas, num_groups, num_nodes, num_gpus), phy2log,
                 phyrank, logcnt);
      },
      "DeepSeek-exact EPLB. weight [L, E] float32, group_load [L, num_groups] float32 (per-group "
      "sums); writes phy2log [L, R], phyrank [L, R], logcnt [L, E] int64. The global policy is "
      "num_groups = num_nodes = 1.",
      py::arg("weight"), py::arg("group_load"), py::arg("num_layers"), py::arg("num_experts"),
      py::arg("num_replicas"), py::arg("num_groups"), py::arg("num_nodes"), py::arg("num_gpus"),
      py::arg("phy2log"), py::arg("phyrank"), py::arg("logcnt"));
  m.def(
      "eplb_balanced",
      [](uintptr_t weight, int64_t num_layers, int64_t num_experts, int64_t num_replicas,
         int64_t num_groups, int64_t num_nodes, int64_t num_gpus, uintptr_t deepseek_phy2log,
         uintptr_t old_phy2log, uintptr_t phy2log, uintptr_t num_changed) {
        balanced(weight, num_layers,
                 make_shape(num_experts, num_replicas, num_groups, num_nodes, num_gpus),
                 deepseek_phy2log, old_phy2log, phy2log, num_changed);
      },
      "Duplicate-free EPLB. weight [L, E] float64, deepseek_phy2log [L, R] int64 (eplb_deepseek's "
      "result for the same shape), old_phy2log [L, R] int64 or 0; writes phy2log [L, R] int64 and, "
      "when old_phy2log is given, num_changed [L] int64.",
      py::arg("weight"), py::arg("num_layers"), py::arg("num_experts"), py::arg("num_replicas"),
      py::arg("num_groups"), py::arg("num_nodes"), py::arg("num_gpus"),
      py::arg("deepseek_phy2log"), py::arg("old_phy2log"), py::arg("phy2log"),
      py::arg("num_changed"));
  m.def("balanced_packing", &packing,
        "DeepSeek's balanced_packing row by row. weight [rows, n] float32; writes pack and rank "
        "[rows, n] int64.",
        py::arg("weight"), py::arg("rows"), py::arg("n"), py::arg("num_packs"), py::arg("pack"),
        py::arg("rank"));
  m.def("replicate_experts", &replicate,
        "DeepSeek's replicate_experts row by row. weight [rows, n] float32; writes phy2log and "
        "rank [rows, num_phy] int64, logcnt [rows, n] int64.",
        py::arg("weight"), py::arg("rows"), py::arg("n"), py::arg("num_phy"), py::arg("phy2log"),
        py::arg("rank"), py::arg("logcnt"));
  m.def("eplb_log2phy", &log2phy,
        "Inverse placement map. phy2log, phyrank [L, R] int64 (-1 = unused slot); writes "
        "log2phy [L, E, maxcnt] int64, -1 padded. False if an id or rank is out of range.",
        py::arg("phy2log"), py::arg("phyrank"), py::arg("num_layers"), py::arg("num_replicas"),
        py::arg("num_experts"), py::arg("maxcnt"), py::arg("log2phy"));
#if defined(EPLB_WITH_CUDA)
  m.def(
      "copy_rows_cuda",
      [](int device, const std::vector<std::uintptr_t>& src, const std::vector<std::uintptr_t>& dst,
         const std::vector<std::int64_t>& bytes, int blocks_per_sm, std::int64_t chunk_bytes,
         std::uintptr_t stream, std::uintptr_t gate_table, int gate_rows, int gate_cols,
         int gate_rank, std::uintptr_t gate_state) {
        eplb::CopyGate gate;
        gate.table = common::address<const long long>(gate_table);
        gate.state = common::address<int>(gate_state);
        gate.rows = gate_rows;
        gate.cols = gate_cols;
        gate.rank = gate_rank;
        eplb::copy_rows(device, src, dst, bytes, blocks_per_sm, chunk_bytes, stream, gate);
      },
      "Queue the byte copies src[i] -> dst[i] (device addresses, bytes[i] each) on a CUDA stream "
      "in one launch per 64 copies; with gate_table (int64 [gate_rows, gate_cols]) only if the "
      "gate passes (eplb/row_copy.py).",
      py::arg("device"), py::arg("src"), py::arg("dst"), py::arg("bytes"), py::arg("blocks_per_sm"),
      py::arg("chunk_bytes"), py::arg("stream"), py::arg("gate_table") = 0,
      py::arg("gate_rows") = 0, py::arg("gate_cols") = 0, py::arg("gate_rank") = 0,
      py::arg("gate_state") = 0);
  m.def("close_gate_cuda", &eplb::close_gate,
        "Close a row-copy gate (state: int32 [2] on the device) unless a launch claimed it; "
        "returns the state it found, 1 if claimed (eplb/row_copy.py).",
        py::arg("device"), py::arg("state"), py::call_guard<py::gil_scoped_release>());
  m.def("new_stream_cuda", &eplb::new_stream,
        "A new non-blocking CUDA stream of a device, used by nothing else (its handle); loads "
        "the gate's kernels on the device.",
        py::arg("device"));
  m.def("load_gate_kernels_cuda", &eplb::load_gate_kernels,
        "Load the kernels of gated row copies on a device now (once per device).",
        py::arg("device"));
#endif
}
