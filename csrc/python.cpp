// The pybind11 module: eager fast paths that take a whole Python list at once, so that no
// per-tensor work happens in Python (a list comprehension over 2000 .grad costs more than
// the kernels) and the dispatcher does not box the list. Each calls the same C++ function
// as its dispatcher op (ops.h). Kept apart from gradclip.cpp: Python headers are slow to
// compile.
//
// Only torch's public header for Python bindings, torch/python.h. The list loop unpacks
// each item with THPVariable_Check/THPVariable_Unpack from it, which give a reference to
// the at::Tensor inside the Python object (no reference-count round trip per tensor);
// tests/test_cuda_backend.py::test_fast_path_sees_the_python_tensors pins them.

#include <torch/python.h>

#include <optional>
#include <vector>

#include "ops.h"
#include "pack.h"

namespace gradclip {
namespace {

using Refs = std::vector<const at::Tensor*>;

// What a fast path returns when it does not take its input: the caller then calls the
// dispatcher op, which takes everything the op supports (tensor subclasses included).
py::object not_taken() { return py::reinterpret_borrow<py::object>(Py_NotImplemented); }

// The tensors of a Python list or tuple, or with take_grad the .grad of each (None skipped),
// by reference into `out`; false if it is not a list or tuple of tensors.
bool unpack(py::handle sequence, bool take_grad, Refs& out) {
  PyObject* seq = sequence.ptr();
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    // Exact torch.Tensor and nn.Parameter are checked without going through isinstance.
    if (!THPVariable_Check(items[i])) return false;
    const at::Tensor& item = THPVariable_Unpack(items[i]);
    if (!take_grad) {
      out.push_back(&item);
    } else if (item.grad().defined()) {
      out.push_back(&item.grad());
    }
  }
  return true;
}

bool supported_dtype(at::ScalarType type) { return dtype_code(type).has_value(); }

// Whether the kernels take every tensor as it is: plain dense-layout CUDA float tensors (no
// tensor subclass such as DTensor or a fake tensor) of one device, at least one.
bool kernels_take(const Refs& tensors) {
  if (tensors.empty()) return false;
  const at::Device device = tensors[0]->device();
  for (const at::Tensor* t : tensors) {
    if (!t->is_cuda() || t->device() != device || t->layout() != at::kStrided ||
        !supported_dtype(t->scalar_type()) || !t->has_storage() ||
        t->unsafeGetTensorImpl()->is_python_dispatch()) {
      return false;
    }
  }
  return true;
}

// The list (or the .grad of its parameters) when the fast path takes it, else nullopt.
std::optional<Refs> collect(py::handle sequence, bool take_grad) {
  Refs tensors;
  if (!unpack(sequence, take_grad, tensors) || !kernels_take(tensors)) return std::nullopt;
  return tensors;
}

py::object norm_stats(py::handle tensors, double norm_type, double max_norm,
                      const std::optional<at::Tensor>& inv_scale) {
  const auto list = collect(tensors, /*take_grad=*/false);
  if (!list) return not_taken();
  return py::cast(norm_stats_cuda(TensorRefs(*list), norm_type, max_norm, inv_scale));
}

py::object scale(py::handle tensors, const at::Tensor& scale, const std::optional<at::Tensor>& found_inf) {
  const auto list = collect(tensors, /*take_grad=*/false);
  if (!list) return not_taken();
  scale_cuda(TensorRefs(*list), scale, found_inf);
  return py::none();
}

py::object clamp(py::handle tensors, double clip_value) {
  const auto list = collect(tensors, /*take_grad=*/false);
  if (!list) return not_taken();
  clamp_cuda(TensorRefs(*list), clip_value);
  return py::none();
}

py::object clip_grads(py::handle grads, double norm_type, double max_norm,
                      const std::optional<at::Tensor>& inv_scale) {
  const auto list = collect(grads, /*take_grad=*/false);
  if (!list) return not_taken();
  return py::cast(clip_grads_cuda(TensorRefs(*list), norm_type, max_norm, inv_scale));
}

py::object clip_parameters(py::handle params, double norm_type, double max_norm,
                           const std::optional<at::Tensor>& inv_scale) {
  const auto grads = collect(params, /*take_grad=*/true);
  if (!grads) return not_taken();
  return py::cast(clip_grads_cuda(TensorRefs(*grads), norm_type, max_norm, inv_scale));
}

bool accepts(py::handle tensors) { return collect(tensors, /*take_grad=*/false).has_value(); }

// Test helper (no GPU needed): what the fast paths read from a Python list. The host
// replays of the kernels are a test-only module (tests/csrc/replay.cpp).

py::object unpacked(py::handle sequence, bool take_grad) {
  Refs tensors;
  if (!unpack(sequence, take_grad, tensors)) return py::none();
  py::list out;
  for (const at::Tensor* t : tensors) out.append(py::cast(*t));
  return out;
}

py::dict dtype_codes() {
  py::dict codes;
  for (const at::ScalarType type : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble}) {
    codes[py::cast(type)] = static_cast<int>(*dtype_code(type));
  }
  return codes;
}

}  // namespace
}  // namespace gradclip

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gradclip's CUDA extension. The ops are torch.ops.gradclip.*; the functions here are "
            "their eager fast paths, which return NotImplemented for a list they do not take "
            "(see accepts); the caller then calls the op.";
  m.def("norm_stats", &gradclip::norm_stats, py::arg("tensors"), py::arg("norm_type"),
        py::arg("max_norm"), py::arg("inv_scale") = py::none(), "gradclip::norm_stats on a list or tuple.");
  m.def("scale_", &gradclip::scale, py::arg("tensors"), py::arg("scale"), py::arg("found_inf") = py::none(),
        "gradclip::scale_ on a list or tuple.");
  m.def("clamp_", &gradclip::clamp, py::arg("tensors"), py::arg("clip_value"),
        "gradclip::clamp_ on a list or tuple.");
  m.def("clip_grads_", &gradclip::clip_grads, py::arg("grads"), py::arg("norm_type"),
        py::arg("max_norm"), py::arg("inv_scale") = py::none(), "gradclip::clip_grads_ on a list or tuple.");
  m.def("clip_parameters_", &gradclip::clip_parameters, py::arg("params"), py::arg("norm_type"),
        py::arg("max_norm"), py::arg("inv_scale") = py::none(),
        "gradclip::clip_grads_ on the .grad of a list of parameters (None grads skipped), read in C++.");
  m.def("accepts", &gradclip::accepts, py::arg("tensors"),
        "Whether the fast paths take this list or tuple whole: dense-layout CUDA float tensors "
        "of one device, no tensor subclasses.");
  m.def("unpacked", &gradclip::unpacked, py::arg("sequence"), py::arg("take_grad") = false,
        "Test helper: the tensors the fast paths read from a list or tuple (with take_grad, the "
        "defined .grad of each parameter), as Python objects; None when it is not one of tensors.");
  m.attr("DTYPE_CODES") = gradclip::dtype_codes();
}
