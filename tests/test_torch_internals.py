"""The private torch internals gradclip relies on, each pinned by a test.

Each has no public equivalent (where one exists, gradclip uses it). If a torch release
changes one of them, the test that fails names what changed and the gradclip code that
depends on it, instead of a wrong number or an AttributeError deep inside a step.
"""

from __future__ import annotations

import inspect

import torch
from torch.amp import grad_scaler

import gradclip


def test_foreach_ops_gradclip_uses_exist():
    """backends/reference.py and base.py: torch's multi-tensor ops (what torch's own
    clip_grad_norm_ uses), with the dtype= upcast of _foreach_norm."""
    x = [torch.ones(3, dtype=torch.bfloat16), torch.ones(2, dtype=torch.bfloat16)]
    norms = torch._foreach_norm(x, 2.0, dtype=torch.float32)
    assert [n.dtype for n in norms] == [torch.float32, torch.float32]
    torch._foreach_mul_(x, torch.tensor(2.0))
    assert torch.equal(x[0], torch.full((3,), 2.0, dtype=torch.bfloat16))
    torch._foreach_clamp_min_(x, -1.0)
    torch._foreach_clamp_max_(x, 1.0)
    assert torch.equal(x[1], torch.ones(2, dtype=torch.bfloat16))
    assert torch.equal(torch._foreach_mul(x, 3.0)[0], torch.full((3,), 3.0, dtype=torch.bfloat16))


def test_group_tensors_by_device_and_dtype_keeps_input_order():
    """backends/dispatch.py and base.group_by_dtype: torch's C++ grouping (torch's clip uses
    it) must return {(device, dtype): ([tensors in input order], indices)}."""
    a, b, c = torch.ones(1), torch.ones(1, dtype=torch.float64), torch.zeros(2)
    groups = torch._C._group_tensors_by_device_and_dtype([[a, b, c]], False)
    ([group], _) = groups[(torch.device("cpu"), torch.float32)]
    assert len(group) == 2 and group[0] is a and group[1] is c
    assert groups[(torch.device("cpu"), torch.float64)][0][0][0] is b


def test_optimizer_hook_dicts_and_patch_step_function():
    """optimizer.py: ClippedOptimizer shares the inner optimizer's param_groups instead of
    calling Optimizer.__init__, so it sets up the hook dicts and the step patch itself."""
    from gradclip.optimizer import _HOOK_DICTS

    plain = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    for name in _HOOK_DICTS:
        assert isinstance(getattr(plain, name, None), dict), f"torch.optim.Optimizer.{name} is gone"
    assert callable(getattr(torch.optim.Optimizer, "_patch_step_function", None)), \
        "torch.optim.Optimizer._patch_step_function is gone"
    calls = []
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    opt = gradclip.ClippedOptimizer(torch.optim.SGD([p], lr=0.1))
    opt.register_step_pre_hook(lambda *args: calls.append("pre"))
    opt.register_step_post_hook(lambda *args: calls.append("post"))
    opt.step()
    assert calls == ["pre", "post"], "the step hooks must run through the wrapper's step"


def test_grad_scaler_internals_gradclip_scaler_uses():
    """amp.py: gradclip.GradScaler.step reads the per-optimizer state torch's step keeps."""
    assert [s.name for s in grad_scaler.OptState] == ["READY", "UNSCALED", "STEPPED"]
    scaler = torch.amp.GradScaler("cpu")
    assert callable(getattr(scaler, "_check_scale_growth_tracker", None))
    p = torch.nn.Parameter(torch.ones(1))
    p.grad = torch.ones(1)
    opt = torch.optim.SGD([p], lr=0.1)
    scaler.scale(p.sum())
    scaler.unscale_(opt)
    state = scaler._per_optimizer_states[id(opt)]
    assert state["stage"] is grad_scaler.OptState.UNSCALED
    assert set(state["found_inf_per_device"]) == {torch.device("cpu")}


def test_fused_optimizer_grad_scale_protocol():
    """optimizer.py: torch's fused optimizers say _step_supports_amp_scaling and read
    grad_scale and found_inf attributes in step(): the wrapper folds its clip factor there."""
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 8.0)
    fused = torch.optim.SGD([p], lr=1.0, fused=True)
    assert fused._step_supports_amp_scaling is True
    assert "grad_scaler" not in inspect.signature(fused.step).parameters
    fused.grad_scale = torch.tensor(8.0)
    fused.found_inf = torch.tensor(0.0)
    fused.step()
    del fused.grad_scale, fused.found_inf
    # lr 1 and grads 8 / grad_scale 8: one step of size 1 from 1, if the scale divided.
    assert torch.equal(p.detach(), torch.zeros(4)), "grad_scale must divide the grads"


def test_fused_optimizer_skips_on_found_inf():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    fused = torch.optim.AdamW([p], lr=1.0, fused=True)
    fused.grad_scale, fused.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    fused.step()
    assert torch.equal(p.detach(), torch.ones(4)), "found_inf must skip the fused update"


def test_register_fake_takes_the_registering_module_from_stacklevel():
    """backends/fakes.py: register_fakes registers on behalf of its caller (register_fake's
    _stacklevel), so that torch finds the fakes of the C++ ops in the module their
    TORCH_LIBRARY names (set_python_module("gradclip.backends.cuda"); the end-to-end check
    is test_cuda_backend.py::test_fakes_are_registered_whichever_module_loads_the_extension)."""
    assert "_stacklevel" in inspect.signature(torch.library.register_fake).parameters
    lib = torch.library.Library("gradclip_pin_test", "FRAGMENT")
    try:
        lib.define("probe(Tensor x) -> Tensor")

        def register():  # a helper that registers for its caller, as register_fakes does
            torch.library.register_fake("gradclip_pin_test::probe", lambda x: x.new_empty(x.shape),
                                        _stacklevel=2)

        register()
        with torch._subclasses.fake_tensor.FakeTensorMode():
            assert torch.ops.gradclip_pin_test.probe(torch.empty(3)).shape == (3,)
    finally:
        lib._destroy()


def test_tensor_from_host_data_is_lift_fresh_in_dispatch():
    """tests/test_dispatch.py (FailOnHostData): a tensor built from a Python list reaches a
    TorchDispatchMode as aten.lift_fresh, which is how the test sees a host-built index."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Record():
        torch.tensor([0, 2])
    assert torch.ops.aten.lift_fresh.default in seen
