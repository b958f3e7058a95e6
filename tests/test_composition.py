"""Every feature with every other: the composition matrix (issue 21's acceptance test).

Every combination of

- ``max_norm``: a float, ZClip, AutoClip, PerTensor, AGC;
- scaler: none, ``torch.amp.GradScaler``, ``gradclip.GradScaler``;
- inner optimizer: SGD (momentum), AdamW, AdamW(fused=True);
- spike guard: none, ``flag``, ``clip``, ``skip``;
- eager, or the step under ``torch.compile``

runs a few steps of a small model, one of them a spike and one with an inf gradient, through
``ClippedOptimizer``, and again as the loop a user writes with torch alone: ``unscale_``
(torch's scaler), the rule's own torch/timm/Keras equivalent (``clip_grads_with_norm_``
with ZClip's or AutoClip's threshold from the papers' ports, ``clip_grad_norm_`` per
tensor, timm's ``adaptive_clip_grad``), the guard's documented rule from its port, then
``step`` or no step, and ``update``. Parameters, optimizer state, the scale and every
norm the wrapper reports must agree, or the combination raises the one documented error at
construction. ``docs/design.md`` holds the table of what composes; the test reads it.

Eagerly, every combination runs. Compiled (Dynamo with the ``aot_eager`` backend: the
capture, graph breaks, guards and the functionalization of in-place state updates of any
``torch.compile``; Inductor's code generation is test_compile.py's), each new optimizer
recompiles, 5-15 s here: the product would take half an hour. CI compiles a covering
subset instead, in which every pair of settings (rule and scaler, scaler and guard, ...)
appears at least once; ``GRADCLIP_TEST_FULL_MATRIX=1`` compiles the whole product.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import pytest
import torch
from recipes import GuardPort
from test_rules import autoclip_port, zclip_port

import gradclip

# Every feature with every other: each part is tested alone in the other files, under every torch.
pytestmark = pytest.mark.newest_torch

STEPS = 6
SPIKE_STEP, INF_STEP = 3, 4
LOSS_WEIGHTS = [1.0, 1.3, 0.8, 40.0, 1.0, 1.1]
INIT_SCALE = 256.0

RULES = {
    "float": lambda: 1.0,
    "zclip": lambda: gradclip.ZClip(warmup_steps=2),
    "autoclip": lambda: gradclip.AutoClip(50.0, history=8),
    "per_tensor": lambda: gradclip.PerTensor(0.6),
    "agc": lambda: gradclip.AGC(clip_factor=0.05, eps=1e-3),
}
SCALERS = (None, "torch", "gradclip")
INNER = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
}
GUARDS = (None, "flag", "clip", "skip")
GUARD_SETTINGS = dict(window=3, warmup=2)
LOCAL = ("per_tensor", "agc")

DESIGN = Path(__file__).resolve().parent.parent / "docs" / "design.md"


def documented_refusals() -> set[tuple[str, str]]:
    """(max_norm, guard action) pairs docs/design.md's composition table marks refused."""
    text = DESIGN.read_text()
    table = text[text.index("<!-- composition table -->"):]
    rows = [line for line in table.splitlines()[1:] if line.startswith("|")]
    header = [c.strip().strip("`") for c in rows[0].strip("|").split("|")]
    refused = set()
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rule = cells[0].strip("`")
        for action, cell in zip(header[1:], cells[1:]):
            if cell.lower().startswith("refused"):
                refused.add((rule, action))
    return refused


def refused(rule: str, guard: str | None) -> bool:
    return (rule, "none" if guard is None else guard) in REFUSED


REFUSED = documented_refusals()


# -- the model, the data, the two loops ---------------------------------------------------


def make_params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 6), (8,), (3, 8), (3,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.5) for s in shapes]


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen))
            for _ in range(STEPS)]


def backward(params, batch, weight: float, scaler, step: int) -> None:
    w1, b1, w2, b2 = params
    x, y = batch
    loss = (torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y).square().mean() * weight
    (loss if scaler is None else scaler.scale(loss)).backward()
    if step == INF_STEP:
        with torch.no_grad():
            params[0].grad[0, 0] = math.inf


def make_scaler(kind: str | None):
    if kind is None:
        return None
    cls = gradclip.GradScaler if kind == "gradclip" else torch.amp.GradScaler
    return cls("cpu", init_scale=INIT_SCALE, growth_interval=2)


def run_wrapper(rule, scaler_kind, inner, guard, mode, backend="reference"):
    params = make_params()
    spike_guard = None if guard is None else gradclip.SpikeGuard(action=guard, **GUARD_SETTINGS)
    opt = gradclip.ClippedOptimizer(INNER[inner](params), max_norm=RULES[rule](),
                                    spike_guard=spike_guard, backend=backend)
    scaler = make_scaler(scaler_kind)

    def step():
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)

    if mode == "compile":
        step = torch.compile(step, backend="aot_eager")
    norms, scales = {}, []
    for i, (batch, weight) in enumerate(zip(batches(), LOSS_WEIGHTS)):
        opt.zero_grad()
        backward(params, batch, weight, scaler, i)
        steps_before = int(opt.counters[0])
        step()
        if int(opt.counters[0]) > steps_before:  # torch's scaler skips inf steps unseen
            norms[i] = opt.last_norm.item()
        if scaler is not None:
            scaler.update()
            scales.append(scaler.get_scale())
    return params, opt.optimizer, norms, scales


class RulePort:
    """The threshold a global rule sets each step, from the paper's port fed the norms the
    rule learned from (finite ones of the steps taken, as docs/design.md says)."""

    def __init__(self, rule: str):
        self.rule, self.learned = rule, []

    def threshold(self, norm: float, learns: bool) -> float:
        if self.rule == "float":
            return 1.0
        if not math.isfinite(norm):
            return math.inf
        seen = self.learned + [norm]
        if self.rule == "zclip":
            clip = zclip_port(seen, warmup_steps=2)[-1]
        else:
            clip = autoclip_port(seen, 50.0, history=8)[-1]
        if learns:
            self.learned.append(norm)
        return math.inf if clip is None else clip


def run_recipe(rule, scaler_kind, inner, guard):
    """The loop written with torch alone (torch's scaler stands for both scalers)."""
    if rule == "agc":  # the oracle is timm's (CI's oldest-torch run has no timm)
        adaptive_clip_grad = pytest.importorskip("timm.utils.agc").adaptive_clip_grad

    params = make_params()
    opt = INNER[inner](params)
    scaler = make_scaler(None if scaler_kind is None else "torch")
    port = None if guard is None else GuardPort(action=guard, **GUARD_SETTINGS)
    rule_port = RulePort(rule) if rule not in LOCAL else None
    norms, scales = {}, []
    for i, (batch, weight) in enumerate(zip(batches(), LOSS_WEIGHTS)):
        opt.zero_grad()
        backward(params, batch, weight, scaler, i)
        if scaler is not None:
            scaler.unscale_(opt)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norms[i] = norm.item()
        verdict = port.judge(norm.item()) if port is not None else {"skip": False,
                                                                   "clip_limit": math.inf}
        if rule == "per_tensor":
            for p in params:  # Keras' clipnorm: each gradient to its own norm
                torch.nn.utils.clip_grad_norm_([p], 0.6)
        elif rule == "agc":
            adaptive_clip_grad(params, clip_factor=0.05, eps=1e-3)
        else:
            threshold = rule_port.threshold(norm.item(), learns=not verdict["skip"])
            threshold = min(threshold, verdict["clip_limit"])
            torch.nn.utils.clip_grads_with_norm_(params, threshold, norm)
        if not verdict["skip"]:
            (opt.step() if scaler is None else scaler.step(opt))
        if scaler is not None:
            scaler.update()
            scales.append(scaler.get_scale())
    return params, opt, norms, scales


def tolerance(inner: str, scaler_kind, rule: str, backend: str, mode: str = "eager") -> dict:
    # The reference backend on the CPU computes what torch computes, in the same order.
    # A fused inner optimizer under a scaler divides by 1 / (unscale x clip factor) where
    # the recipe multiplies, and compiled, AdamW's step runs as decomposed ops: ulp-level
    # drift, which Adam's division by sqrt(v) magnifies.
    if backend != "reference":
        return {"rtol": 2e-4, "atol": 2e-5}
    if mode == "compile" or (inner == "adamw_fused" and scaler_kind is not None
                             and rule not in LOCAL):
        return {"rtol": 1e-5, "atol": 1e-6}
    return {"rtol": 1e-6, "atol": 1e-7}


def assert_same_run(ours, theirs, tol) -> None:
    params, opt, norms, scales = ours
    ref_params, ref_opt, ref_norms, ref_scales = theirs
    assert scales == ref_scales
    for i, norm in norms.items():
        assert norm == pytest.approx(ref_norms[i], rel=1e-5, nan_ok=True), f"step {i} norm"
    for i, (p, q) in enumerate(zip(params, ref_params)):
        torch.testing.assert_close(p.detach(), q.detach(), equal_nan=True, **tol,
                                   msg=lambda m, i=i: f"parameter {i}: {m}")
        state, ref_state = opt.state[p], ref_opt.state[q]
        assert state.keys() == ref_state.keys()
        for key in state:
            torch.testing.assert_close(state[key], ref_state[key], equal_nan=True, **tol,
                                       msg=lambda m, key=key: f"parameter {i} {key}: {m}")


# -- the matrix -----------------------------------------------------------------------------


SETTINGS = list(itertools.product(RULES, SCALERS, INNER, GUARDS))


def covering_subset(settings: list[tuple]) -> list[tuple]:
    """Settings in which every pair of values of two axes that composes appears at least
    once (greedy: each pick covers the most pairs not yet covered)."""
    def pairs(case):
        return {(i, case[i], j, case[j]) for i, j in itertools.combinations(range(len(case)), 2)}

    composing = [case for case in settings if not refused(case[0], case[3])]
    uncovered = set().union(*map(pairs, composing))
    chosen = []
    while uncovered:
        best = max(composing, key=lambda case: len(pairs(case) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


COMPILED = (SETTINGS if os.environ.get("GRADCLIP_TEST_FULL_MATRIX") == "1"
            else covering_subset(SETTINGS))


def combinations():
    cases = [(*case, "eager") for case in SETTINGS] + [(*case, "compile") for case in COMPILED]
    for rule, scaler, inner, guard, mode in cases:
        ident = f"{rule}-{scaler or 'noscaler'}-{inner}-{guard or 'noguard'}-{mode}"
        yield pytest.param(rule, scaler, inner, guard, mode, id=ident)


@pytest.fixture(scope="module", autouse=True)
def roomy_dynamo():
    """Each combination is a new optimizer, hence new guards: let Dynamo recompile."""
    from torch._dynamo import config

    before = config.recompile_limit
    config.recompile_limit = 10_000
    yield
    config.recompile_limit = before
    torch._dynamo.reset()


@pytest.mark.parametrize("rule, scaler, inner, guard, mode", list(combinations()))
def test_every_combination_matches_the_torch_recipe_or_is_refused(rule, scaler, inner, guard,
                                                                  mode):
    if refused(rule, guard):
        with pytest.raises(ValueError, match="per-tensor"):
            run_wrapper(rule, scaler, inner, guard, mode)
        return
    ours = run_wrapper(rule, scaler, inner, guard, mode)
    assert_same_run(ours, run_recipe(rule, scaler, inner, guard),
                    tolerance(inner, scaler, rule, "reference", mode))


TRITON_SAMPLE = [("float", "gradclip", "adamw_fused", "skip"), ("zclip", "torch", "adamw", "clip"),
                 ("autoclip", None, "sgd", "flag"), ("per_tensor", "gradclip", "sgd", "skip"),
                 ("agc", "torch", "adamw_fused", None), ("float", None, "adamw", "clip")]


@pytest.mark.parametrize("rule, scaler, inner, guard", TRITON_SAMPLE,
                         ids=["-".join(str(x) for x in case) for case in TRITON_SAMPLE])
def test_a_sample_on_the_triton_kernels_matches_the_recipe(rule, scaler, inner, guard):
    if not gradclip.available_backends()["triton"].available:
        pytest.skip("triton cannot run here")
    ours = run_wrapper(rule, scaler, inner, guard, "eager", backend="triton")
    assert_same_run(ours, run_recipe(rule, scaler, inner, guard),
                    tolerance(inner, scaler, rule, "triton"))


def test_the_compiled_subset_covers_every_pair_of_settings():
    assert 0 < len(COMPILED) <= len(SETTINGS)
    for i, j in itertools.combinations(range(4), 2):
        for case in SETTINGS:
            if refused(case[0], case[3]):
                continue
            assert any(c[i] == case[i] and c[j] == case[j] for c in COMPILED), (i, j, case)


def test_the_documented_table_refuses_only_what_cannot_compose():
    """The table's refusals are exactly the guard's clip with a local rule (one global
    threshold cannot be lowered for tensors clipped one by one)."""
    assert REFUSED == {(rule, "clip") for rule in LOCAL}
