// How the kernels split a TensorTable among blocks and threads. Host and device share this
// code, so tests on a machine without a GPU can replay the split (tests/csrc/replay.cpp).
#pragma once

#include "tables.h"

namespace gradclip {

// Chunks [*begin, *end) of block `block` out of `grid`: contiguous, sizes differ by at most 1.
GRADCLIP_HOST_DEVICE inline void block_chunk_range(int64_t num_chunks, int64_t grid, int64_t block,
                                                   int64_t* begin, int64_t* end) {
  *begin = num_chunks * block / grid;
  *end = num_chunks * (block + 1) / grid;
}

GRADCLIP_HOST_DEVICE inline int64_t chunk_begin(const TensorTable& table, int i) {
  return i == 0 ? 0 : table.chunk_end[i - 1];
}

// The first tensor whose chunks end after `chunk` (binary search; skips zero-size tensors).
GRADCLIP_HOST_DEVICE inline int first_tensor_after(const TensorTable& table, int64_t chunk) {
  int lo = 0, hi = table.num_tensors;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (table.chunk_end[mid] > chunk) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// The tensor of AGC row `row` (binary search; tensors with no rows are skipped).
GRADCLIP_HOST_DEVICE inline int agc_tensor_of(const AgcTable& table, int64_t row) {
  int lo = 0, hi = table.num_tensors;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (table.row_end[mid] > row) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// Blocks [*b0, *b1) (of `grid` over `num_chunks` chunks, block_chunk_range's split) whose
// chunks meet chunks [c0, c1) of one tensor; empty when c0 == c1. Block b starts at
// floor(num_chunks * b / grid), so chunk c lies in block ((c + 1) * grid - 1) / num_chunks.
GRADCLIP_HOST_DEVICE inline void tensor_blocks(int64_t num_chunks, int64_t grid, int64_t c0, int64_t c1,
                                               int64_t* b0, int64_t* b1) {
  if (c0 >= c1) {
    *b0 = *b1 = 0;
    return;
  }
  *b0 = ((c0 + 1) * grid - 1) / num_chunks;
  *b1 = (c1 * grid - 1) / num_chunks + 1;
}

// Elements [*first, *last) of tensor i that chunks [c0, c1) cover; false when none.
GRADCLIP_HOST_DEVICE inline bool element_range(const TensorTable& table, int i, int64_t c0, int64_t c1,
                                               int64_t* first, int64_t* last) {
  const int64_t begin = chunk_begin(table, i);
  const int64_t end = table.chunk_end[i];
  const int64_t lo = (c0 > begin ? c0 : begin) - begin;
  const int64_t hi = (c1 < end ? c1 : end) - begin;
  const int64_t per_chunk = kChunkBytes / dtype_size(table.dtype[i]);
  *first = lo * per_chunk;
  *last = hi * per_chunk < table.numel[i] ? hi * per_chunk : table.numel[i];
  return *first < *last;
}

// Calls f(i, first, last) for each tensor i that block `block` of `grid` touches, with the
// element range [first, last) its chunks cover: the kernels' walk (kernels.cu's
// for_each_span), and the tests' host replay of it.
#ifdef __CUDACC__
#pragma nv_exec_check_disable  // f is a __device__ lambda in the kernels, a host one in the replay
#endif
template <typename F>
GRADCLIP_HOST_DEVICE inline void for_each_block_span(const TensorTable& table, int64_t grid,
                                                     int64_t block, F&& f) {
  int64_t c0, c1;
  block_chunk_range(table.num_chunks, grid, block, &c0, &c1);
  for (int i = first_tensor_after(table, c0); i < table.num_tensors && chunk_begin(table, i) < c1;
       ++i) {
    int64_t first, last;
    if (element_range(table, i, c0, c1, &first, &last)) f(i, first, last);
  }
}

// A run of n elements at `address`, split as: `head` scalar elements up to the first
// 16-byte boundary, `vectors` aligned 16-byte vectors, then `tail` scalar elements.
struct SpanPlan {
  int64_t head;
  int64_t vectors;
  int64_t tail;
};

GRADCLIP_HOST_DEVICE inline SpanPlan plan_span(uintptr_t address, int elem_size, int64_t n) {
  SpanPlan plan;
  if (address % elem_size != 0) {
    plan.head = n;  // never for torch tensors; all scalar, still correct
  } else {
    plan.head = static_cast<int64_t>((16 - address % 16) % 16) / elem_size;
    if (plan.head > n) plan.head = n;
  }
  const int64_t per_vector = 16 / elem_size;
  plan.vectors = (n - plan.head) / per_vector;
  plan.tail = n - plan.head - plan.vectors * per_vector;
  return plan;
}

}  // namespace gradclip
