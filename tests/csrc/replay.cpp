// A test-only module: host replays of how the CUDA kernels split their work, and of how the
// ops pack what they write, for machines without a GPU. tests/test_cuda_backend.py builds it
// (with csrc/pack.cpp, without CUDA) and checks on meta and CPU tensors that every element is
// read once, vectors are aligned, the per-tensor norm slots line up, AGC's warps cover each
// row once, and no two kernel threads are given one element to write. Nothing here is in
// the production extension.

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "device_helpers.cuh"
#include "pack.h"
#include "tables.h"

namespace gradclip {
namespace {

// How the kernels would split `tensors` among `grid` blocks: for each tensor the fewest and
// most reads of one element (1 and 1 when the split is right).
struct SplitReplay {
  bool ok = true;  // no misaligned vector, no access outside a tensor
  int launches = 0;
  std::vector<int> min_visits, max_visits;
};

// The norm and pointwise kernels' walk of `table` over `grid` blocks of `threads` threads
// (kernels.cu: for_each_span, then each thread's heads, kUnroll vectors and tails): adds to
// visits[i][e] for each element e of tensor i a thread would read; false if a vector access
// would be misaligned or a thread would leave its tensor. Reads no tensor memory.
bool visit_table(const TensorTable& table, int grid, int threads, uint8_t* const* visits) {
  bool ok = true;
  auto visit = [&](int i, int64_t e) {
    if (e < 0 || e >= table.numel[i]) {
      ok = false;
    } else {
      ++visits[i][e];
    }
  };
  for (int block = 0; block < grid; ++block) {
    for_each_block_span(table, grid, block, [&](int i, int64_t first, int64_t last) {
      const int size = dtype_size(table.dtype[i]);
      const int per_vector = 16 / size;
      const uintptr_t address = reinterpret_cast<uintptr_t>(table.ptr[i]) + first * size;
      const SpanPlan plan = plan_span(address, size, last - first);
      if (plan.vectors > 0 && (address + plan.head * size) % 16 != 0) ok = false;
      if (plan.head + plan.vectors * per_vector + plan.tail != last - first) ok = false;
      const int64_t body = first + plan.head, tail = body + plan.vectors * per_vector;
      for (int t = 0; t < threads; ++t) {
        for (int64_t k = t; k < plan.head; k += threads) visit(i, first + k);
        for (int64_t v = t; v < plan.vectors; v += int64_t{threads} * kUnroll) {
          for (int u = 0; u < kUnroll; ++u) {
            const int64_t j = v + int64_t{u} * threads;
            if (j < plan.vectors) {
              for (int e = 0; e < per_vector; ++e) visit(i, body + j * per_vector + e);
            }
          }
        }
        for (int64_t k = t; k < plan.tail; k += threads) visit(i, tail + k);
      }
    });
  }
  return ok;
}

// The per-tensor slots of a norm launch over `grid` blocks: true when the slots the norm
// kernel writes for each tensor are exactly those the finaliser reads, and no slot is
// written twice. `block_offset` and `tensor_offset` place the launch in its call.
bool table_slots_line_up(const TensorTable& table, int grid, int block_offset, int tensor_offset,
                         uint8_t* slot_writes, int64_t num_slots) {
  bool ok = true;
  // What the norm kernel writes: for_each_span's walk, block by block.
  for (int block = 0; block < grid; ++block) {
    for_each_block_span(table, grid, block, [&](int i, int64_t, int64_t) {
      const int64_t slot = int64_t{block_offset} + block + tensor_offset + i;
      if (slot < 0 || slot >= num_slots || slot_writes[slot] != 0) {
        ok = false;
        return;
      }
      slot_writes[slot] = 1;
      // What the finaliser reads for tensor i must include this block.
      int64_t b0, b1;
      tensor_blocks(table.num_chunks, grid, chunk_begin(table, i), table.chunk_end[i], &b0, &b1);
      if (block < b0 || block >= b1) ok = false;
    });
  }
  // Every block the finaliser reads was written.
  for (int i = 0; i < table.num_tensors; ++i) {
    int64_t b0, b1;
    tensor_blocks(table.num_chunks, grid, chunk_begin(table, i), table.chunk_end[i], &b0, &b1);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t slot = int64_t{block_offset} + b + tensor_offset + i;
      if (b < 0 || b >= grid || slot >= num_slots || slot_writes[slot] != 1) ok = false;
    }
  }
  return ok;
}

// How agc_kernel assigns rows to the warps of `grid` blocks: adds to visits[i][e] for each
// gradient element e of tensor i a lane would read; false if an access would leave its
// tensor (weight or gradient).
bool visit_agc_rows(const AgcTable& table, int grid, uint8_t* const* visits) {
  bool ok = true;
  const int64_t warps = int64_t{grid} * (kAgcThreads / 32);
  for (int64_t warp = 0; warp < warps; ++warp) {
    for (int64_t row = warp; row < table.num_rows; row += warps) {
      const int i = agc_tensor_of(table, row);
      if (i >= table.num_tensors) {
        ok = false;
        continue;
      }
      const int64_t r = row - (i == 0 ? 0 : table.row_end[i - 1]);
      const int64_t rows = table.row_end[i] - (i == 0 ? 0 : table.row_end[i - 1]);
      if (r < 0 || r >= rows) {
        ok = false;
        continue;
      }
      for (int lane = 0; lane < 32; ++lane) {
        for (int64_t e = lane; e < table.width[i]; e += 32) ++visits[i][r * table.width[i] + e];
      }
    }
  }
  return ok;
}

// For tests without a GPU: only the tensors' addresses and sizes are used.
SplitReplay simulate_split(TensorRefs tensors, int64_t grid, bool replay) {
  TORCH_CHECK(grid > 0, "simulate_split: grid must be > 0, got ", text(grid));
  Packed packed = pack(tensors, "simulate_split", std::nullopt, Access::kRead);
  TORCH_CHECK(packed.copies.empty(), "simulate_split: pass dense tensors");
  SplitReplay result;
  result.launches = packed.num_tables;
  if (!replay) return result;
  std::vector<std::vector<uint8_t>> visits(tensors.size());
  std::vector<uint8_t*> rows;
  for (size_t k = 0; k < tensors.size(); ++k) {
    visits[k].assign(static_cast<size_t>(tensors[k].numel()), 0);
    if (!visits[k].empty()) rows.push_back(visits[k].data());
  }
  size_t row = 0;
  for (int l = 0; l < packed.num_tables; ++l) {
    const TensorTable& table = packed.tables[l];
    const int g = static_cast<int>(std::min<int64_t>(grid, table.num_chunks));
    result.ok &= visit_table(table, g, kBlockThreads, rows.data() + row);
    row += table.num_tensors;
  }
  for (const auto& row_visits : visits) {
    uint8_t lo = 1, hi = 1;
    if (!row_visits.empty()) {
      lo = *std::min_element(row_visits.begin(), row_visits.end());
      hi = *std::max_element(row_visits.begin(), row_visits.end());
    }
    result.min_visits.push_back(lo);
    result.max_visits.push_back(hi);
  }
  return result;
}

bool simulate_agc(TensorRefs params, TensorRefs grads, int64_t grid) {
  TORCH_CHECK(grid > 0, "simulate_agc: grid must be > 0, got ", text(grid));
  AgcPacked packed = pack_agc(params, grads, "simulate_agc", std::nullopt, /*writing=*/false);
  TORCH_CHECK(packed.aside.empty() && packed.copies.empty(), "simulate_agc: pass contiguous tensors");
  std::vector<std::vector<uint8_t>> visits(grads.size());
  std::vector<uint8_t*> rows;
  for (size_t k = 0; k < grads.size(); ++k) {
    visits[k].assign(static_cast<size_t>(grads[k].numel()), 0);
    const int64_t units = grads[k].dim() <= 1 ? 1 : grads[k].size(0);
    if (units > 0) rows.push_back(visits[k].data());  // the tensors pack_agc keeps, in order
  }
  bool ok = true;
  int64_t rows_seen = 0;
  size_t first = 0;
  for (const AgcTable& table : packed.tables) {
    ok &= table.row_offset == rows_seen;
    ok &= visit_agc_rows(table, static_cast<int>(grid), rows.data() + first);
    rows_seen += table.num_rows;
    first += static_cast<size_t>(table.num_tensors);
  }
  for (const auto& tensor_visits : visits) {
    for (const uint8_t v : tensor_visits) ok &= v == 1;
  }
  return ok && rows_seen == packed.total_rows;
}

bool simulate_tensor_slots(TensorRefs tensors, int64_t grid) {
  TORCH_CHECK(grid > 0, "simulate_tensor_slots: grid must be > 0, got ", text(grid));
  Packed packed = pack(tensors, "simulate_tensor_slots", std::nullopt, Access::kRead, Layout::kPerTensor);
  TORCH_CHECK(packed.copies.empty(), "simulate_tensor_slots: pass dense tensors");
  std::vector<int> grids(packed.num_tables);
  int total_blocks = 0, total_tensors = 0;
  for (int l = 0; l < packed.num_tables; ++l) {
    grids[l] = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(packed.tables[l].num_chunks, grid)));
    total_blocks += grids[l];
    total_tensors += packed.tables[l].num_tensors;
  }
  if (total_tensors != static_cast<int>(tensors.size())) return false;  // one entry per tensor
  std::vector<uint8_t> writes(static_cast<size_t>(total_blocks + total_tensors), 0);
  bool ok = true;
  int block_offset = 0, tensor_offset = 0;
  for (int l = 0; l < packed.num_tables; ++l) {
    ok &= table_slots_line_up(packed.tables[l], grids[l], block_offset, tensor_offset,
                              writes.data(), static_cast<int64_t>(writes.size()));
    block_offset += grids[l];
    tensor_offset += packed.tables[l].num_tensors;
  }
  return ok;
}

// What an op that writes `tensors` gives the kernels and what it sets aside for ATen (it
// bumps the version counters of the former, as the op does): the (address, elements) of
// each table entry, in launch order, and the input positions set aside.
py::dict pack_for_writing(const std::vector<at::Tensor>& tensors, bool per_tensor) {
  Packed packed = pack(at::TensorList(tensors), "pack_for_writing", std::nullopt, Access::kWrite,
                       per_tensor ? Layout::kPerTensor : Layout::kCompact);
  py::list entries;
  for (int l = 0; l < packed.num_tables; ++l) {
    const TensorTable& table = packed.tables[l];
    for (int i = 0; i < table.num_tensors; ++i) {
      entries.append(py::make_tuple(reinterpret_cast<uintptr_t>(table.ptr[i]), table.numel[i]));
    }
  }
  py::dict out;
  out["entries"] = entries;
  out["aside"] = static_cast<int64_t>(packed.aside.size());
  out["aside_at"] = packed.aside_at;
  out["repeats"] = packed.has_repeats;
  return out;
}

// What agc_ packs: rows given to the kernel, tensors in its tables, gradients left to ATen.
py::tuple pack_agc_for_writing(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads) {
  AgcPacked packed = pack_agc(at::TensorList(params), at::TensorList(grads), "pack_agc_for_writing",
                              std::nullopt, /*writing=*/true);
  int64_t tensors = 0;
  for (const AgcTable& table : packed.tables) tensors += table.num_tensors;
  return py::make_tuple(packed.total_rows, tensors, static_cast<int64_t>(packed.aside.size()));
}

py::tuple simulate_split_py(const std::vector<at::Tensor>& tensors, int64_t grid, bool replay_split) {
  const SplitReplay replay = simulate_split(at::TensorList(tensors), grid, replay_split);
  return py::make_tuple(replay.ok, replay.launches, replay.min_visits, replay.max_visits);
}

bool simulate_agc_py(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     int64_t grid) {
  return simulate_agc(at::TensorList(params), at::TensorList(grads), grid);
}

bool simulate_tensor_slots_py(const std::vector<at::Tensor>& tensors, int64_t grid) {
  return simulate_tensor_slots(at::TensorList(tensors), grid);
}

}  // namespace
}  // namespace gradclip

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Test-only host replays of gradclip's CUDA kernels and of the ops' packing (no GPU needed).";
  m.def("simulate_split", &gradclip::simulate_split_py, py::arg("tensors"), py::arg("grid"),
        py::arg("replay") = true,
        "How the kernels split a list among blocks: (ok, launches, min_visits, max_visits). With "
        "replay=False it only packs the list.");
  m.def("simulate_tensor_slots", &gradclip::simulate_tensor_slots_py, py::arg("tensors"), py::arg("grid"),
        "Whether the per-tensor norm slots line up for a list split over launches of at most grid "
        "blocks (each written once, read exactly where written).");
  m.def("simulate_agc", &gradclip::simulate_agc_py, py::arg("params"), py::arg("grads"), py::arg("grid"),
        "Whether agc_'s kernel would read every gradient element exactly once (a warp per row) over "
        "grid blocks.");
  m.def("pack_for_writing", &gradclip::pack_for_writing, py::arg("tensors"), py::arg("per_tensor") = false,
        "Check and pack tensors of any device as an op that writes them does (bumping the version "
        "counters of those the kernels write): {'entries': [(address, numel)], 'aside': count, "
        "'aside_at': positions (per_tensor), 'repeats': bool}.");
  m.def("pack_agc_for_writing", &gradclip::pack_agc_for_writing, py::arg("params"), py::arg("grads"),
        "Check and pack AGC's pairs as agc_ does: (rows, tensors in the tables, gradients left to ATen).");
  m.attr("MAX_TENSORS_PER_LAUNCH") = gradclip::kMaxTensorsPerLaunch;
  m.attr("MAX_AGC_TENSORS_PER_LAUNCH") = gradclip::kMaxAgcTensorsPerLaunch;
  m.attr("CHUNK_BYTES") = gradclip::kChunkBytes;
  m.attr("BLOCK_THREADS") = gradclip::kBlockThreads;
}
