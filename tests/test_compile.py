"""torch.compile: compiled steps clip, count and report exactly what eager steps do.

Dynamo drops attribute writes on optimizers, so everything a step updates lives in device
tensors updated in place; a fused inner optimizer's grad_scale hand-off runs eagerly.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BACKEND_DEVICES, on_device

import gradclip

N_STEPS = 4


class PlainSGD(torch.optim.Optimizer):
    """An optimizer whose step Dynamo can trace whole (torch's graph-break on purpose)."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])


INNER = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=0.1),
         "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True),
         "plain_sgd": lambda ps: PlainSGD(ps, lr=0.1)}
SCALERS = {None: None, "torch": torch.amp.GradScaler, "gradclip": gradclip.GradScaler}


def train(inner: str, scaler_kind: str | None, compile_mode: str | None, backend="auto",
          device="cpu"):
    """N steps whose norms alternate between clipped and not; returns what they report."""
    gen = torch.Generator().manual_seed(0)
    dev = on_device(device)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dev))
              for shape in [(40,), (7, 3), ()]]
    opt = gradclip.ClippedOptimizer(INNER[inner](params), max_norm=1.0, backend=backend)
    scaler = None if scaler_kind is None else SCALERS[scaler_kind](device, init_scale=1024.0)

    def step():
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)

    if compile_mode is not None:
        step = torch.compile(step, fullgraph=compile_mode == "fullgraph")
    norms = []
    for i in range(N_STEPS):
        weight = 3.0 if i % 2 else 0.01
        loss = sum((p * p).sum() for p in params) * weight
        (loss if scaler is None else scaler.scale(loss)).backward()
        step()
        if scaler is not None:
            scaler.update()
        norms.append(opt.last_norm.clone())
        opt.zero_grad()
    return [p.detach().clone() for p in params], torch.stack(norms), opt.stats()


def assert_same_run(compiled, eager):
    (params, norms, stats), (ref_params, ref_norms, ref_stats) = compiled, eager
    assert stats == ref_stats
    assert 0 < stats["clipped_steps"] < stats["steps"] == N_STEPS
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=0)
    for p, q in zip(params, ref_params):
        # Inductor fuses AdamW's arithmetic differently from eager: ulp-level drift.
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("scaler_kind", [None, "torch", "gradclip"])
def test_compiled_steps_report_what_eager_steps_report(scaler_kind):
    assert_same_run(train("adamw", scaler_kind, "default"), train("adamw", scaler_kind, None))


@pytest.mark.parametrize("scaler_kind", ["torch", "gradclip"])
def test_compiled_scaler_step_with_a_fused_inner_optimizer(scaler_kind):
    """torch's own compiled scaler.step(AdamW(fused=True)) runs; so must the wrapper's."""
    assert_same_run(train("adamw_fused", scaler_kind, "default"),
                    train("adamw_fused", scaler_kind, None))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES,
                         ids=[f"{b}-{d}" for b, d in BACKEND_DEVICES])
def test_fullgraph_step_with_a_traceable_inner_optimizer(backend, device):
    """torch.optim optimizers graph-break in step() on purpose; one that does not lets the
    whole wrapped step, clip included, compile into one graph."""
    assert_same_run(train("plain_sgd", None, "fullgraph", backend, device),
                    train("plain_sgd", None, None, backend, device))
