// Packing tensor lists into kernel tables, on the host: every check an op makes before it
// writes anything, and what the kernels may not write themselves. Only ATen's core headers
// (no CUDA): the ops (gradclip.cpp, agc.cpp) and the tests' host replay of the kernels
// (tests/csrc/replay.cpp, built without CUDA) pack alike.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "tables.h"

namespace gradclip {

// Numbers in error messages go in as strings: an ostream's numeric formatting crashed
// (SIGSEGV in num_put) where the toolchain linked a second, static libstdc++ into the
// extension, and std::to_string does not touch stream locales.
template <typename Number>
std::string text(Number value) {
  return std::to_string(value);
}

// A list of tensors by reference: an ATen list (the ops) or pointers to tensors owned by
// Python objects (the fast path: no reference-count round trip per tensor; valid while the
// caller holds the GIL and the objects).
class TensorRefs {
 public:
  TensorRefs(at::TensorList list) : list_(list) {}  // NOLINT: implicit on purpose
  explicit TensorRefs(const std::vector<const at::Tensor*>& pointers)
      : pointers_(pointers.data()), size_(pointers.size()) {}
  size_t size() const { return pointers_ != nullptr ? size_ : list_.size(); }
  bool empty() const { return size() == 0; }
  const at::Tensor& operator[](size_t k) const { return pointers_ != nullptr ? *pointers_[k] : list_[k]; }

 private:
  at::TensorList list_;
  const at::Tensor* const* pointers_ = nullptr;
  size_t size_ = 0;
};

// The code of a supported dtype in the kernels' tables, or nullopt.
std::optional<DType> dtype_code(at::ScalarType type);

// What a call does with the tensors it packs.
enum class Access {
  // Reads only (norm): a tensor that is not dense (a strided view such as x[:, ::2]) is
  // read as a contiguous copy.
  kRead,
  // Writes in place. Refuses a tensor whose elements share memory (an expanded view), as
  // ATen's in-place ops do. Tensors the kernels must not write are set aside for ATen,
  // which writes them one by one after the kernels: those that are not dense, and (Layout::
  // kCompact) those whose memory overlaps an entry the kernels write, so that no two
  // threads write one element and an entry listed twice is written once per entry, in
  // turn, as torch's foreach ops do on the CPU. Every other tensor has its autograd version
  // counter bumped, as an ATen in-place op would (the kernels write through raw pointers,
  // which autograd cannot see; ATen bumps the ones set aside itself).
  kWrite,
};

// Whether the tables keep one entry per input tensor (the per-tensor ops index their
// outputs by it): zero-size tensors get an entry with no chunks, and so do, with
// Access::kWrite, a tensor set aside for ATen and a later entry of a tensor listed twice
// (the per-tensor ops write each tensor once, with its first entry's factor). Tensors that
// overlap without being the same are refused there: their factors would compete.
enum class Layout { kCompact, kPerTensor };

// The tables of one call: tensors split into launches of kMaxTensorsPerLaunch at most.
// Zero-size tensors are left out (they have no chunks); an apex bug dropped the pending
// launch when one came last, so the packing does not depend on what comes last.
struct Packed {
  std::vector<TensorTable> tables;
  int num_tables = 0;
  bool any_double = false;
  bool has_repeats = false;         // kWrite, kPerTensor: an entry repeats an earlier tensor
  std::vector<at::Tensor> copies;   // Access::kRead: contiguous copies, alive until launched
  std::vector<at::Tensor> aside;    // Access::kWrite: the tensors ATen writes, in input order
  std::vector<int64_t> aside_at;    // with kPerTensor: their positions in the input

  Packed();
  Packed(Packed&&) = default;
  Packed& operator=(Packed&&) = delete;
  ~Packed();
};

TensorTable& next_table(Packed& packed);

// Checks every tensor (defined, strided layout, float dtype, on `device` when given; with
// kWrite, memory it can write) before it packs any, and packs the dense ones; `op` names
// the caller in error messages.
Packed pack(TensorRefs tensors, const char* op, std::optional<at::Device> device, Access access,
            Layout layout = Layout::kCompact);

// The AGC tables of a call: (weight, gradient) pairs as rows, split into launches. A
// gradient listed twice is packed once (its first entry's weight decides); gradients that
// overlap otherwise are refused.
struct AgcPacked {
  std::vector<AgcTable> tables;
  std::vector<at::Tensor> copies;   // contiguous copies of weights that are not
  std::vector<size_t> aside;        // gradients whose rows are not contiguous: ATen
  int64_t total_rows = 0;
  bool any_double = false;
};

AgcPacked pack_agc(TensorRefs params, TensorRefs grads, const char* op, std::optional<at::Device> device,
                   bool writing);

}  // namespace gradclip
