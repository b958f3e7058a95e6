// Packing tensor lists into kernel tables (pack.h). Host code, ATen's core headers only.

#include "pack.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace gradclip {
namespace {

// Tables are 32 KB each: a call takes the thread's spare set and gives it back when done,
// instead of allocating per call.
std::vector<TensorTable>& spare_tables() {
  thread_local std::vector<TensorTable> spare;
  return spare;
}

void append(Packed& packed, TensorTable*& table, void* ptr, int64_t numel, DType dtype) {
  if (table == nullptr || table->num_tensors == kMaxTensorsPerLaunch) table = &next_table(packed);
  const int64_t bytes = numel * dtype_size(dtype);
  const int i = table->num_tensors++;
  table->num_chunks += (bytes + kChunkBytes - 1) / kChunkBytes;
  table->chunk_end[i] = table->num_chunks;
  table->ptr[i] = ptr;
  table->numel[i] = numel;
  table->dtype[i] = dtype;
}

// Whether two elements of `t` are one location (a dimension of size > 1 with stride 0, as
// expand makes): ATen's in-place ops refuse such a tensor, and so do the ops that write.
bool shares_memory_within(const at::Tensor& t) {
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.stride(d) == 0 && t.size(d) > 1) return true;
  }
  return false;
}

void check_writable(const at::Tensor& t, const char* op, const char* what, size_t k) {
  TORCH_CHECK(!shares_memory_within(t), op, ": ", what, "[", text(k), "] has elements that share memory, "
              "as an expanded or stride-0 view has; it cannot be written in place, and no tensor was "
              "changed. Give it memory of its own, e.g. .clone() it");
}

// The byte addresses [lo, hi) of one non-empty tensor's elements, and its position.
struct Span {
  uintptr_t lo;
  uintptr_t hi;
  size_t k;
};

Span span_of(const at::Tensor& t, size_t k) {
  int64_t low = 0, high = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t step = (t.size(d) - 1) * t.stride(d);
    (step < 0 ? low : high) += step;
  }
  const auto start = reinterpret_cast<intptr_t>(t.data_ptr());
  const int64_t size = static_cast<int64_t>(t.element_size());
  return {static_cast<uintptr_t>(start + low * size), static_cast<uintptr_t>(start + (high + 1) * size), k};
}

// `a` and `b` (of one span) hold the very same elements: the same tensor, listed twice.
bool same_elements(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.numel() != b.numel()) return false;
  return (a.sizes() == b.sizes() && a.strides() == b.strides()) || (a.is_contiguous() && b.is_contiguous());
}

// Spans in input order, ascending or descending, none overlapping the next: the usual case
// (separate allocations, or views of one flat buffer), decided without a sort.
bool apart_in_order(const std::vector<Span>& spans) {
  bool up = true, down = true;
  for (size_t i = 1; i < spans.size() && (up || down); ++i) {
    up = up && spans[i].lo >= spans[i - 1].hi;
    down = down && spans[i].hi <= spans[i - 1].lo;
  }
  return up || down;
}

enum class Role : uint8_t {
  kKernel,  // the kernels write it
  kAside,   // ATen writes it, after the kernels (Layout::kCompact: it overlaps a kernel entry)
  kRepeat,  // Layout::kPerTensor: a later entry of a tensor listed twice, not written again
};

// What becomes of each entry of a list an op writes. The kernels' entries never overlap;
// with per-tensor factors a tensor is written once, and tensors that overlap without being
// the same are refused.
std::vector<Role> write_roles(TensorRefs tensors, bool per_tensor, const char* op, const char* what) {
  std::vector<Role> roles(tensors.size(), Role::kKernel);
  std::vector<Span> spans;
  spans.reserve(tensors.size());
  for (size_t k = 0; k < tensors.size(); ++k) {
    if (tensors[k].numel() > 0) spans.push_back(span_of(tensors[k], k));
  }
  if (apart_in_order(spans)) return roles;
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.lo != b.lo ? a.lo < b.lo : a.hi != b.hi ? a.hi < b.hi : a.k < b.k;
  });
  uintptr_t reach = 0, kernel_reach = 0;  // furthest end of all spans, of the kernels' spans
  size_t reach_k = 0;
  const Span* head = nullptr;  // the first of the spans equal to the current one
  for (const Span& s : spans) {
    if (head == nullptr || s.lo >= reach) {
      head = &s;
    } else if (per_tensor) {
      const bool repeat = head->lo == s.lo && head->hi == s.hi && same_elements(tensors[head->k], tensors[s.k]);
      TORCH_CHECK(repeat, op, ": ", what, "[", text(std::min(reach_k, s.k)), "] and ", what, "[",
                  text(std::max(reach_k, s.k)), "] overlap in memory without being the same tensor, so "
                  "clipping each by its own factor has no one answer; no tensor was changed. Pass tensors "
                  "with memory of their own (e.g. .clone() one of them)");
      roles[s.k] = Role::kRepeat;
    }
    if (!per_tensor) {
      if (s.lo >= kernel_reach) {
        kernel_reach = s.hi;
      } else {
        roles[s.k] = Role::kAside;
      }
    }
    if (s.hi > reach) {
      reach = s.hi;
      reach_k = s.k;
    }
  }
  return roles;
}

}  // namespace

Packed::Packed() { tables.swap(spare_tables()); }

Packed::~Packed() {
  if (tables.capacity() > spare_tables().capacity()) tables.swap(spare_tables());
}

std::optional<DType> dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return kFloat;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kHalf;
    case at::kDouble: return kDouble;
    default: return std::nullopt;
  }
}

TensorTable& next_table(Packed& packed) {
  if (static_cast<int>(packed.tables.size()) <= packed.num_tables) {
    packed.tables.resize(packed.num_tables + 1);
  }
  TensorTable& table = packed.tables[packed.num_tables++];
  table.num_chunks = 0;
  table.num_tensors = 0;
  table.block_offset = 0;
  return table;
}

Packed pack(TensorRefs tensors, const char* op, std::optional<at::Device> device, Access access,
            Layout layout) {
  const bool per_tensor = layout == Layout::kPerTensor;
  const bool writing = access == Access::kWrite;
  // Every check first: a bad tensor late in the list leaves the earlier ones untouched
  // (their version counters too).
  for (size_t k = 0; k < tensors.size(); ++k) {
    const at::Tensor& t = tensors[k];
    TORCH_CHECK(t.defined(), op, ": tensors[", text(k), "] is None; pass only defined tensors");
    TORCH_CHECK(t.layout() == at::kStrided, op, ": tensors[", text(k), "] has layout ", t.layout(),
                "; only dense (strided) tensors are supported, densify it with .to_dense()");
    TORCH_CHECK(dtype_code(t.scalar_type()).has_value(), op, ": tensors[", text(k), "] has dtype ",
                c10::toString(t.scalar_type()), "; supported are float16, bfloat16, float32 and float64");
    TORCH_CHECK(!device.has_value() || t.device() == *device, op, ": tensors[", text(k), "] is on ",
                t.device().str(), " but tensors[0] is on ", device->str(),
                "; pass the tensors of one CUDA device per call");
    if (writing) check_writable(t, op, "tensors", k);
  }
  const std::vector<Role> roles = writing ? write_roles(tensors, per_tensor, op, "tensors") : std::vector<Role>();
  Packed packed;
  TensorTable* table = nullptr;
  for (size_t k = 0; k < tensors.size(); ++k) {
    const at::Tensor& t = tensors[k];
    const DType dtype = *dtype_code(t.scalar_type());
    packed.any_double |= dtype == kDouble;
    // Dense tensors, permuted or not, are read as their storage span; others are not.
    const bool dense = t.is_non_overlapping_and_dense();
    if (writing) {
      if (roles[k] == Role::kRepeat) {
        packed.has_repeats = true;
        append(packed, table, nullptr, 0, dtype);
        continue;
      }
      if (roles[k] == Role::kAside || !dense) {
        packed.aside.push_back(t);
        if (per_tensor) {
          packed.aside_at.push_back(static_cast<int64_t>(k));
          append(packed, table, nullptr, 0, dtype);
        }
        continue;
      }
      // Raises for an inference tensor outside inference mode, as ATen's in-place ops do.
      t.unsafeGetTensorImpl()->bump_version();
    }
    const int64_t numel = t.numel();
    if (numel == 0) {
      if (per_tensor) append(packed, table, nullptr, 0, dtype);
      continue;
    }
    const at::Tensor* source = &t;
    if (!dense) {
      packed.copies.push_back(t.contiguous());
      source = &packed.copies.back();
    }
    void* ptr = source->data_ptr();
    TORCH_CHECK(reinterpret_cast<uintptr_t>(ptr) % dtype_size(dtype) == 0, op, ": tensors[", text(k),
                "] is not aligned to its element size; pass a tensor made by torch, or .clone() it");
    append(packed, table, ptr, numel, dtype);
  }
  return packed;
}

AgcPacked pack_agc(TensorRefs params, TensorRefs grads, const char* op, std::optional<at::Device> device,
                   bool writing) {
  TORCH_CHECK(params.size() == grads.size(), op, ": ", text(params.size()), " params for ",
              text(grads.size()), " grads; pass one parameter per gradient");
  for (size_t k = 0; k < grads.size(); ++k) {
    const at::Tensor& w = params[k];
    const at::Tensor& g = grads[k];
    TORCH_CHECK(w.defined() && g.defined(), op, ": params[", text(k), "] or grads[", text(k), "] is None");
    TORCH_CHECK(dtype_code(w.scalar_type()).has_value() && dtype_code(g.scalar_type()).has_value(), op,
                ": params[", text(k), "] and grads[", text(k), "] must be float16, bfloat16, float32 or float64");
    TORCH_CHECK(w.sizes() == g.sizes(), op, ": params[", text(k), "] and grads[", text(k),
                "] differ in shape; pass each parameter with its own gradient");
    TORCH_CHECK(!device.has_value() || (w.device() == *device && g.device() == *device), op,
                ": params[", text(k), "] or grads[", text(k), "] is not on ", device->str());
    TORCH_CHECK(w.layout() == at::kStrided && g.layout() == at::kStrided, op,
                ": only dense (strided) tensors are supported");
    if (writing) check_writable(g, op, "grads", k);
  }
  const std::vector<Role> roles =
      writing ? write_roles(grads, /*per_tensor=*/true, op, "grads") : std::vector<Role>();
  AgcPacked packed;
  AgcTable* table = nullptr;
  for (size_t k = 0; k < grads.size(); ++k) {
    if (writing && roles[k] == Role::kRepeat) continue;  // clipped once, by its first entry
    const at::Tensor& w = params[k];
    const at::Tensor& g = grads[k];
    const DType wd = *dtype_code(w.scalar_type()), gd = *dtype_code(g.scalar_type());
    packed.any_double |= gd == kDouble;
    if (!g.is_contiguous()) {
      packed.aside.push_back(k);
      continue;
    }
    const int64_t rows = g.dim() <= 1 ? 1 : g.size(0);
    if (rows == 0) continue;
    if (writing) g.unsafeGetTensorImpl()->bump_version();
    const at::Tensor* weight = &w;
    if (!w.is_contiguous()) {
      packed.copies.push_back(w.contiguous());
      weight = &packed.copies.back();
    }
    if (table == nullptr || table->num_tensors == kMaxAgcTensorsPerLaunch) {
      packed.tables.emplace_back();
      table = &packed.tables.back();
      table->num_rows = 0;
      table->row_offset = packed.total_rows;
      table->num_tensors = 0;
    }
    const int i = table->num_tensors++;
    table->num_rows += rows;
    table->row_end[i] = table->num_rows;
    table->width[i] = g.numel() / rows;
    table->weight[i] = weight->data_ptr();
    table->grad[i] = g.data_ptr();
    table->weight_dtype[i] = wd;
    table->grad_dtype[i] = gd;
    packed.total_rows += rows;
  }
  return packed;
}

}  // namespace gradclip
