// The pybind11 module: eager fast paths that take a whole Python list at once, so that no
// per-tensor work happens in Python (a list comprehension over 2000 .grad costs more than
// the kernels). Kept apart from gradclip.cpp: torch's Python headers are slow to compile.

#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <vector>

#include "kernels.h"
#include "ops.h"

namespace gradclip {
namespace {

bool supported_dtype(at::ScalarType type) {
  return type == at::kHalf || type == at::kBFloat16 || type == at::kFloat || type == at::kDouble;
}

// A plain dense-layout CUDA float tensor (not a tensor subclass such as DTensor or a fake
// tensor) on `device` (set by the first one).
bool takes(const at::Tensor& t, std::optional<at::Device>& device) {
  if (!t.is_cuda() || t.layout() != at::kStrided || !supported_dtype(t.scalar_type()) ||
      !t.has_storage() || t.unsafeGetTensorImpl()->is_python_dispatch()) {
    return false;
  }
  if (!device.has_value()) device = t.device();
  return t.device() == *device;
}

// The tensors of a Python list or tuple (or their .grad, skipping None) into `out`; false
// when the fast path does not take them, and the caller then goes the general way.
bool collect(py::handle sequence, bool take_grad, std::vector<const at::Tensor*>& out) {
  PyObject* seq = sequence.ptr();
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  auto* tensor_type = reinterpret_cast<PyTypeObject*>(THPVariableClass);
  if (tensor_type == nullptr) return false;
  out.reserve(static_cast<size_t>(n));
  std::optional<at::Device> device;
  for (Py_ssize_t i = 0; i < n; ++i) {
    // A C-level subtype check: isinstance() would go through the metaclass.
    if (!PyObject_TypeCheck(items[i], tensor_type)) return false;
    const at::Tensor& item = THPVariable_Unpack(items[i]);
    if (take_grad) {
      const at::Tensor& grad = item.grad();
      if (!grad.defined()) continue;
      if (!takes(grad, device)) return false;
      out.push_back(&grad);
    } else {
      if (!takes(item, device)) return false;
      out.push_back(&item);
    }
  }
  return !out.empty();
}

py::object wrap(const at::Tensor& t) { return py::reinterpret_steal<py::object>(THPVariable_Wrap(t)); }

std::optional<at::Tensor> optional_tensor(py::handle h, const char* name) {
  if (h.is_none()) return std::nullopt;
  TORCH_CHECK(PyObject_TypeCheck(h.ptr(), reinterpret_cast<PyTypeObject*>(THPVariableClass)),
              name, " must be a tensor or None");
  return THPVariable_Unpack(h.ptr());
}

py::object clip_parameters(py::handle params, double norm_type, double max_norm, py::handle inv_scale) {
  std::vector<const at::Tensor*> grads;
  if (!collect(params, /*take_grad=*/true, grads)) return py::none();
  return wrap(clip_grads_cuda(TensorRefs(grads), norm_type, max_norm, optional_tensor(inv_scale, "inv_scale")));
}

py::object clip_grads(py::handle grads, double norm_type, double max_norm, py::handle inv_scale) {
  std::vector<const at::Tensor*> tensors;
  if (!collect(grads, /*take_grad=*/false, tensors)) return py::none();
  return wrap(clip_grads_cuda(TensorRefs(tensors), norm_type, max_norm, optional_tensor(inv_scale, "inv_scale")));
}

py::object norm_stats(py::handle tensors, double norm_type, double max_norm, py::handle inv_scale) {
  std::vector<const at::Tensor*> list;
  if (!collect(tensors, /*take_grad=*/false, list)) return py::none();
  return wrap(norm_stats_cuda(TensorRefs(list), norm_type, max_norm, optional_tensor(inv_scale, "inv_scale")));
}

bool scale(py::handle tensors, py::handle scale, py::handle found_inf) {
  std::vector<const at::Tensor*> list;
  if (!collect(tensors, /*take_grad=*/false, list)) return false;
  const std::optional<at::Tensor> factor = optional_tensor(scale, "scale");
  TORCH_CHECK(factor.has_value(), "scale must be a tensor");
  scale_cuda(TensorRefs(list), *factor, optional_tensor(found_inf, "found_inf"));
  return true;
}

bool clamp(py::handle tensors, double clip_value) {
  std::vector<const at::Tensor*> list;
  if (!collect(tensors, /*take_grad=*/false, list)) return false;
  clamp_cuda(TensorRefs(list), clip_value);
  return true;
}

bool accepts(py::handle tensors) {
  std::vector<const at::Tensor*> list;
  return collect(tensors, /*take_grad=*/false, list);
}

py::tuple simulate_split_py(py::handle tensors, int64_t grid, bool replay_split) {
  std::vector<const at::Tensor*> list;
  for (py::handle item : tensors) list.push_back(&THPVariable_Unpack(item.ptr()));
  const SplitReplay replay = gradclip::simulate_split(TensorRefs(list), grid, replay_split);
  return py::make_tuple(replay.ok, replay.launches, replay.min_visits, replay.max_visits);
}

}  // namespace
}  // namespace gradclip

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gradclip's CUDA extension. The ops are torch.ops.gradclip.*; these are eager fast paths.";
  m.def("clip_parameters", &gradclip::clip_parameters, py::arg("params"), py::arg("norm_type"),
        py::arg("max_norm"), py::arg("inv_scale") = py::none(),
        "Norm then rescale of the .grad of a list of parameters (None grads skipped); returns "
        "stats, or None when the grads are not all dense-layout CUDA float tensors of one "
        "device (then take the general path).");
  m.def("clip_grads", &gradclip::clip_grads, py::arg("grads"), py::arg("norm_type"),
        py::arg("max_norm"), py::arg("inv_scale") = py::none(),
        "clip_parameters over a list of the gradients themselves.");
  m.def("norm_stats", &gradclip::norm_stats, py::arg("tensors"), py::arg("norm_type"),
        py::arg("max_norm"), py::arg("inv_scale") = py::none(),
        "gradclip::norm_stats without the dispatcher; None when the fast path does not take the list.");
  m.def("scale_", &gradclip::scale, py::arg("tensors"), py::arg("scale"), py::arg("found_inf") = py::none(),
        "gradclip::scale_ without the dispatcher; False when the fast path does not take the list.");
  m.def("clamp_", &gradclip::clamp, py::arg("tensors"), py::arg("clip_value"),
        "gradclip::clamp_ without the dispatcher; False when the fast path does not take the list.");
  m.def("accepts", &gradclip::accepts, py::arg("tensors"),
        "Whether the fast paths take this list or tuple whole: dense-layout CUDA float tensors "
        "of one device, no tensor subclasses.");
  m.def("simulate_split", &gradclip::simulate_split_py, py::arg("tensors"), py::arg("grid"),
        py::arg("replay") = true,
        "Test helper: replay on the host how the kernels split a list among blocks; returns "
        "(ok, launches, min_visits, max_visits). With replay=False it only packs the list.");
  m.attr("MAX_TENSORS_PER_LAUNCH") = gradclip::kMaxTensorsPerLaunch;
  m.attr("CHUNK_BYTES") = gradclip::kChunkBytes;
  m.attr("BLOCK_THREADS") = gradclip::kBlockThreads;
}
