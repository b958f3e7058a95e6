"""``torch.library.opcheck`` of every registered op: the schema (what each op writes), the
fake implementation (shapes and dtypes under tracing), and that the op behaves the same
through the dispatcher, under ``torch.compile``'s tracing and with fake tensors.

Both namespaces: ``gradclip_triton::`` (the Triton backend's ``torch.library`` ops, checked
where its kernels run: the interpreter on the CPU, CUDA on a GPU) and ``gradclip::`` (the
CUDA extension's ops: on meta tensors wherever the extension builds, on CUDA tensors on a
GPU). What the ops compute is checked by test_backend_contract.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BACKEND_DEVICES, gpu, random_tensors

from gradclip.backends import cuda_build, get_backend

OPS = ("agc_", "clamp_", "clip_grads_", "clip_per_tensor_", "norm_stats", "norm_stats_per_tensor",
       "scale_", "scale_per_tensor_")
CAN_BUILD = cuda_build.build_problem() is None or cuda_build.prebuilt_available()
TRITON_DEVICES = [pytest.param(device, marks=[gpu] if device == "cuda" else [], id=device)
                  for name, device in BACKEND_DEVICES if name == "triton"]
# Every op with its optional tensors given, and the ops that have some without them.
CASES = [pytest.param(op, True, id=op) for op in OPS] + [
    pytest.param(op, False, id=f"{op}-without-optional")
    for op in ("clip_grads_", "norm_stats", "norm_stats_per_tensor", "scale_")]


def _args(op: str, tensors: list[torch.Tensor], amp: bool = True) -> tuple:
    """Arguments of ``op`` on ``tensors`` (copies for the ops that write); with ``amp`` an
    ``inv_scale``, and a ``found_inf`` for ``scale_``."""
    def one(value):
        return torch.full((1,), value, device=tensors[0].device)

    inv_scale = one(0.5) if amp else None
    copies = [t.clone() for t in tensors]
    return {"norm_stats": (tensors, 2.0, 1.0, inv_scale),
            "scale_": (copies, one(0.5), one(0.0) if amp else None),
            "clamp_": (copies, 0.5),
            "clip_grads_": (copies, 2.0, 0.5, inv_scale),
            "norm_stats_per_tensor": (tensors, 2.0, 1.0, inv_scale),
            "scale_per_tensor_": (copies, torch.linspace(0.25, 1.0, len(tensors), device=tensors[0].device)),
            "clip_per_tensor_": (copies, 2.0, 0.5),
            "agc_": ([torch.ones_like(t) for t in tensors], copies, 0.01, 1e-3, 2.0)}[op]


def _opcheck(namespace, op: str, args: tuple) -> None:
    result = torch.library.opcheck(getattr(namespace, op).default, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.fixture(scope="module")
def ext():
    """The CUDA extension, built (or taken from the cache) once per test session."""
    if not CAN_BUILD:
        pytest.skip(f"cannot build the CUDA extension here: {cuda_build.build_problem()}")
    return cuda_build.load_extension()


@pytest.mark.parametrize("op, amp", CASES)
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_ops_pass_opcheck(gen, device, op, amp):
    get_backend("triton")  # registers gradclip_triton::*
    tensors = random_tensors(gen, [(3,), (0,), (40,), ()],
                             [torch.float32, torch.bfloat16, torch.float16, torch.float32],
                             torch.device(device))
    _opcheck(torch.ops.gradclip_triton, op, _args(op, tensors, amp))


@pytest.mark.parametrize("op", OPS)
def test_cuda_ops_pass_opcheck_on_meta_tensors(ext, op):
    tensors = [torch.empty(5, device="meta"), torch.empty(0, device="meta"),
               torch.empty(3, 2, dtype=torch.bfloat16, device="meta")]
    _opcheck(torch.ops.gradclip, op, _args(op, tensors))


@gpu
@pytest.mark.parametrize("op", OPS)
def test_cuda_ops_pass_opcheck_on_cuda(gen, op):
    cuda_build.load_extension()
    tensors = random_tensors(gen, [(1000,), (0,), (70_001,), (3,)],
                             [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16], torch.device("cuda", torch.cuda.current_device()))
    _opcheck(torch.ops.gradclip, op, _args(op, tensors))
