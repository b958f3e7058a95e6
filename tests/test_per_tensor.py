"""Per-tensor clipping (Keras' ``clipnorm``) and adaptive gradient clipping (timm's AGC):
every backend that runs here against a float64 oracle written from the definitions, and
against the projects people use (Keras 3 on torch, timm)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import DTYPE_MIXES, on_device, random_tensors
from reference import norm_rtol, storage_rtol

import gradclip

NORM_TYPES = [2.0, 1.0, math.inf, 3.5]
# 0-d, 1-d, Linear, conv, empty; rows and tensors longer than the interpreter's 64-element chunk
SHAPES = [(), (7,), (8, 5), (4, 3, 3, 3), (0,), (0, 3), (3, 0), (150,), (3, 150)]
GPU_SHAPES = [(1 << 16,), (3, 100_003), (257, 4099)]


def _shapes(device):
    return SHAPES + (GPU_SHAPES if device == "cuda" else [])


def _params(gen, device, mix, grad_scales, weight_scale=1.0):
    """Parameters of every shape, whose grads are scaled per tensor by ``grad_scales``
    (cycled) and, for AGC, per unit by a factor in [0.2, 5]: some units clip, some do not."""
    shapes = _shapes(device)
    dtypes = [mix[i % len(mix)] for i in range(len(shapes))]
    weights = random_tensors(gen, shapes, dtypes, on_device(device), weight_scale)
    params = []
    for i, w in enumerate(weights):
        grad = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        if w.ndim > 1:
            grad *= torch.rand((w.shape[0],) + (1,) * (w.ndim - 1), generator=gen,
                               dtype=torch.float64).mul(math.log(25)).exp().mul(0.2)
        p = torch.nn.Parameter(w)
        p.grad = (grad * grad_scales[i % len(grad_scales)]).to(w.dtype).to(w.device)
        params.append(p)
    return params


def _float64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().double()


def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.ndim <= 1 else t.reshape(t.shape[0], math.prod(t.shape[1:]))


TIE = 1e-4  # a unit this close to its limit may be clipped (by a factor within TIE of 1) or not


def _assert_scaled(after: torch.Tensor, before: torch.Tensor, coefs: torch.Tensor, what: str,
                   rtol: float, ties: torch.Tensor) -> None:
    """``after`` equals ``before * coefs`` (per unit) to ``rtol`` of the largest value, and
    units whose factor is 1 are bitwise unchanged; units flagged in ``ties`` (norm within
    rounding of the limit) may go either way."""
    rows_after, rows_before = _unit_rows(_float64(after)), _unit_rows(_float64(before))
    coefs = torch.where(ties, 1.0, coefs).reshape(-1, 1)
    expected = rows_before * coefs
    if expected.numel():
        scale = expected.abs().max().clamp_min(1e-300)
        error = (rows_after - expected).abs().amax(dim=1) / scale
        allowed = torch.where(ties, 2 * TIE, rtol)
        assert bool((error <= allowed).all()), f"{what}: relative errors {error.tolist()} > {rtol}"
    untouched = (coefs.reshape(-1) == 1.0) & ~ties
    assert torch.equal(rows_after[untouched], rows_before[untouched]), f"{what}: unclipped unit written"


def _near(norms: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    return (norms - limits).abs() <= TIE * limits


# -- clip_grad_norm_per_tensor_ ----------------------------------------------------------

@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("mix", list(DTYPE_MIXES))
def test_per_tensor_clip_matches_float64_oracle(backend_device, gen, mix, norm_type):
    name, device = backend_device
    params = _params(gen, device, DTYPE_MIXES[mix], grad_scales=[0.01, 3.0, 0.3])
    before = [p.grad.clone() for p in params]
    norms = gradclip.clip_grad_norm_per_tensor_(params, 1.0, norm_type, backend=name)
    rtol = norm_rtol(before)
    for i, (p, g) in enumerate(zip(params, before)):
        want = float(torch.linalg.vector_norm(_float64(g).reshape(-1), norm_type)) if g.numel() else 0.0
        assert math.isclose(norms[i].item(), want, rel_tol=rtol, abs_tol=1e-30), f"norm {i}"
        units = _unit_rows(g).shape[0]
        coef = torch.full((units,), min(1.0, 1.0 / (want + 1e-6)), dtype=torch.float64)
        ties = _near(torch.full((units,), want, dtype=torch.float64), torch.ones(units, dtype=torch.float64))
        _assert_scaled(p.grad, g, coef, f"{g.dtype} {tuple(g.shape)}", 2 * storage_rtol(g.dtype) + rtol,
                       ties)


def test_per_tensor_clip_leaves_small_gradients_bitwise_untouched(backend_device, gen):
    name, device = backend_device
    params = _params(gen, device, DTYPE_MIXES["mixed"], grad_scales=[1e-3])
    before = [p.grad.clone() for p in params]
    gradclip.clip_grad_norm_per_tensor_(params, 100.0, backend=name)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))


KERAS_SHAPES = [(), (5,), (8, 5), (4, 3, 3, 3), (0,), (150,)]


@pytest.mark.parametrize("clipnorm", [0.5, 4.0])
def test_per_tensor_clip_matches_keras_clipnorm(backend_device, gen, clipnorm):
    """Keras 3 on torch: an SGD with lr=1 built with clipnorm= applies -clipped grad."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    assert keras.backend.backend() == "torch", "set KERAS_BACKEND=torch before keras is imported"
    name, device = backend_device
    grads = random_tensors(gen, KERAS_SHAPES, torch.float32, scale=2.0)
    variables = [keras.Variable(torch.zeros(s).numpy()) for s in KERAS_SHAPES]
    keras.optimizers.SGD(learning_rate=1.0, clipnorm=clipnorm).apply_gradients(
        zip([g.clone() for g in grads], variables))
    params = [torch.nn.Parameter(torch.zeros(s, device=on_device(device))) for s in KERAS_SHAPES]
    for p, g in zip(params, grads):
        p.grad = g.clone().to(p.device)
    gradclip.clip_grad_norm_per_tensor_(params, clipnorm, backend=name)
    for p, v in zip(params, variables):
        applied = -torch.as_tensor(keras.ops.convert_to_numpy(v.value))
        # Keras divides by max(norm, clipnorm), torch by norm + 1e-6: 1e-6 / norm apart.
        torch.testing.assert_close(p.grad.cpu(), applied, rtol=2e-6, atol=1e-7)


def test_error_if_nonfinite_raises_before_any_write(backend_device, gen):
    name, device = backend_device
    params = _params(gen, device, [torch.float32], grad_scales=[5.0])
    params[2].grad[0, 0] = math.inf
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="error_if_nonfinite"):
        gradclip.clip_grad_norm_per_tensor_(params, 1.0, error_if_nonfinite=True, backend=name)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))


def test_per_tensor_clip_with_a_nan_gradient_nans_only_that_tensor(backend_device, gen):
    name, device = backend_device
    params = _params(gen, device, [torch.float32], grad_scales=[5.0])
    params[1].grad[3] = math.nan
    norms = gradclip.clip_grad_norm_per_tensor_(params, 1.0, backend=name)
    assert math.isnan(norms[1].item()) and params[1].grad.isnan().all()
    assert params[2].grad.isfinite().all()


def test_complex_and_real_gradients_in_one_list_keep_their_order(gen):
    """Complex gradients go to the reference backend, real ones to the chosen one: the norms
    come back in input order and each tensor gets its own factor."""
    grads = [torch.randn(5, generator=gen) * 3, torch.randn(3, dtype=torch.complex64, generator=gen) * 3,
             torch.full((4,), 1e-3)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norms = gradclip.clip_grad_norm_per_tensor_(params, 1.0)
    want = [float(g.abs().double().norm()) for g in grads]
    assert norms.tolist() == pytest.approx(want, rel=2e-5)
    for p, g, n in zip(params, grads, want):
        torch.testing.assert_close(p.grad, g * min(1.0, 1.0 / (n + 1e-6)))


def test_parameters_without_grads_are_skipped():
    with_grad, without = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3))
    with_grad.grad = torch.full((4,), 2.0)
    norms = gradclip.clip_grad_norm_per_tensor_([without, with_grad], 1.0)
    assert norms.tolist() == [4.0]
    assert gradclip.clip_grad_norm_per_tensor_([without], 1.0).shape == (0,)


# -- adaptive_clip_grad_ -----------------------------------------------------------------

def agc_oracle(params, clip_factor, eps, norm_type):
    """(factor per unit of each tensor, near ties per unit, global grad norm), in float64
    from the definition."""
    coefs, ties, unit_norms = [], [], []
    for p in params:
        w, g = _unit_rows(_float64(p)), _unit_rows(_float64(p.grad))
        if w.shape[1] == 0:
            wn = gn = torch.zeros(w.shape[0], dtype=torch.float64)
        else:
            wn = torch.linalg.vector_norm(w, norm_type, dim=1)
            gn = torch.linalg.vector_norm(g, norm_type, dim=1)
        limit = wn.clamp(min=eps) * clip_factor
        coefs.append(torch.where(gn < limit, 1.0, limit / gn.clamp(min=1e-6)))
        ties.append(_near(gn, limit))
        unit_norms.append(gn)
    return coefs, ties, float(torch.linalg.vector_norm(torch.cat(unit_norms), norm_type))


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("mix", list(DTYPE_MIXES))
def test_agc_matches_float64_oracle(backend_device, gen, mix, norm_type):
    name, device = backend_device
    params = _params(gen, device, DTYPE_MIXES[mix], grad_scales=[0.01])
    before = [p.grad.clone() for p in params]
    coefs, ties, norm = agc_oracle(params, 0.01, 1e-3, norm_type)
    got = gradclip.adaptive_clip_grad_(params, 0.01, 1e-3, norm_type, backend=name)
    assert math.isclose(got.item(), norm, rel_tol=norm_rtol(before))
    assert any(bool((c < 1).any()) for c in coefs) and any(bool((c == 1).any()) for c in coefs)
    rtol = norm_rtol(before)
    for p, g, c, t in zip(params, before, coefs, ties):
        _assert_scaled(p.grad, g, c, f"{g.dtype} {tuple(g.shape)}", 2 * storage_rtol(g.dtype) + 2 * rtol, t)


TIMM_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _timm_model(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LayerNorm(16),
                                torch.nn.Linear(16, 6))
    model.register_parameter("scalar", torch.nn.Parameter(torch.tensor(0.5)))
    model.register_parameter("empty", torch.nn.Parameter(torch.zeros(0, 3)))
    return model.to(dtype)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("dtype", TIMM_DTYPES, ids=str)
def test_agc_matches_timm(backend_device, gen, dtype, norm_type):
    agc = pytest.importorskip("timm.utils.agc")
    name, device = backend_device
    ours, theirs = _timm_model(dtype).to(on_device(device)), _timm_model(dtype)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        scale = torch.rand((), generator=gen).item() * 0.05
        grad = torch.randn(a.shape, generator=gen, dtype=torch.float64) * scale
        a.grad, b.grad = grad.to(dtype).to(a.device), grad.to(dtype)
    gradclip.adaptive_clip_grad_(ours.parameters(), 0.01, 1e-3, norm_type, backend=name)
    agc.adaptive_clip_grad(theirs.parameters(), 0.01, 1e-3, norm_type)
    # timm computes the norms and the factor in the parameters' dtype, gradclip in float32.
    rtol = 1e-5 if dtype in (torch.float32, torch.float64) else 4 * storage_rtol(dtype)
    subnormal_step = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    for (n, a), b in zip(ours.named_parameters(), theirs.parameters()):
        top = float(b.grad.abs().max()) if b.grad.numel() else 0.0
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=rtol, atol=rtol * top + subnormal_step,
                                   msg=lambda m: f"{n}: {m}")


def test_agc_with_nonfinite_gradients_matches_timm(backend_device):
    agc = pytest.importorskip("timm.utils.agc")
    name, device = backend_device
    w = torch.ones(3, 4)
    g = torch.full((3, 4), 1e-3)
    g[1, 2], g[2, 0] = math.nan, math.inf
    ours = torch.nn.Parameter(w.clone().to(on_device(device)))
    theirs = torch.nn.Parameter(w.clone())
    ours.grad, theirs.grad = g.clone().to(ours.device), g.clone()
    gradclip.adaptive_clip_grad_([ours], backend=name)
    agc.adaptive_clip_grad([theirs])
    torch.testing.assert_close(ours.grad.cpu(), theirs.grad, equal_nan=True)


# -- the rules -----------------------------------------------------------------------------

def test_per_tensor_rule_clips_and_returns_the_global_norm(backend_device, gen):
    name, device = backend_device
    params = _params(gen, device, [torch.float32], grad_scales=[3.0, 0.01])
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    want = float(torch.linalg.vector_norm(torch.cat([_float64(p.grad).reshape(-1) for p in params])))
    norm = gradclip.PerTensor(1.0).clip_(params, backend=name)
    assert norm.shape == () and math.isclose(norm.item(), want, rel_tol=2e-5)
    gradclip.clip_grad_norm_per_tensor_(copies, 1.0, backend=name)
    assert all(torch.equal(p.grad, c.grad) for p, c in zip(params, copies))


@pytest.mark.parametrize("how", ["parameters", "predicate"])
def test_agc_rule_leaves_excluded_parameters_alone(backend_device, gen, how):
    name, device = backend_device
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    model.to(on_device(device))
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)  # every unit clips
    head = list(model[2].parameters())
    exclude = model[2].parameters() if how == "parameters" else (lambda p: any(p is h for h in head))
    rule = gradclip.AGC(clip_factor=0.01, exclude=exclude)
    before = [p.grad.clone() for p in model.parameters()]
    want = float(torch.linalg.vector_norm(torch.cat([_float64(g).reshape(-1) for g in before])))
    norm = rule.clip_(list(model.parameters()), backend=name)
    assert math.isclose(norm.item(), want, rel_tol=2e-5)
    assert all(torch.equal(h.grad, g) for h, g in zip(head, before[2:]))
    assert all(not torch.equal(p.grad, g) for p, g in zip(model[0].parameters(), before[:2]))


def test_rules_round_trip_their_settings():
    rule = gradclip.AGC(0.02, 1e-4, norm_type=1.0)
    other = gradclip.AGC()
    other.load_state_dict(rule.state_dict())
    assert (other.clip_factor, other.eps, other.norm_type) == (0.02, 1e-4, 1.0)
    per = gradclip.PerTensor(1.0)
    per.load_state_dict(gradclip.PerTensor(3.0, math.inf).state_dict())
    assert (per.max_norm, per.norm_type) == (3.0, math.inf)


# -- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [-1.0, math.nan])
def test_bad_thresholds_are_value_errors_naming_the_argument(value):
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="max_norm"):
        gradclip.clip_grad_norm_per_tensor_([p], value)
    with pytest.raises(ValueError, match="max_norm"):
        gradclip.PerTensor(value)
    with pytest.raises(ValueError, match="clip_factor"):
        gradclip.adaptive_clip_grad_([p], clip_factor=value)
    with pytest.raises(ValueError, match="eps"):
        gradclip.adaptive_clip_grad_([p], eps=value)
    with pytest.raises(ValueError, match="clip_factor"):
        gradclip.AGC(clip_factor=value)
    with pytest.raises(ValueError, match="eps"):
        gradclip.AGC(eps=value)
    assert torch.equal(p.grad, torch.ones(3))


def test_bad_exclude_and_non_numbers_are_type_errors():
    with pytest.raises(TypeError, match="exclude"):
        gradclip.AGC(exclude=["fc.weight"])
    with pytest.raises(TypeError, match="clip_factor"):
        gradclip.AGC(clip_factor="big")


# -- torch.compile and CUDA graphs -------------------------------------------------------------

def _clip_both(params, factor, backend):
    """Set the grads to ``factor`` x the weights, clip per tensor, then AGC."""
    for p in params:
        p.grad = p.detach() * factor
    norms = gradclip.clip_grad_norm_per_tensor_(params, 1.0, backend=backend)
    return norms, gradclip.adaptive_clip_grad_(params, 0.01, backend=backend)


def test_compiled_clips_match_eager(backend_device):
    name, device = backend_device
    gen = torch.Generator().manual_seed(0)
    shapes = [(40,), (7, 3), ()]
    eager = [torch.nn.Parameter(torch.randn(s, generator=gen).to(on_device(device))) for s in shapes]
    compiled = [torch.nn.Parameter(p.detach().clone()) for p in eager]
    step = torch.compile(_clip_both, fullgraph=True)
    for factor in (3.0, 1e-3):  # everything clips, then nothing does
        want = _clip_both(eager, factor, name)
        got = step(compiled, factor, name)
        torch.testing.assert_close(got, want)
        for a, b in zip(compiled, eager):
            torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton", "reference"])
def test_clips_replay_in_a_cuda_graph(gen, name):
    params = _params(gen, "cuda", DTYPE_MIXES["mixed"], grad_scales=[0.01, 3.0])
    fresh = [p.grad.clone() for p in params]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: builds and uploads the tables
        gradclip.clip_grad_norm_per_tensor_(params, 1.0, backend=name)
        gradclip.adaptive_clip_grad_(params, backend=name)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norms = gradclip.clip_grad_norm_per_tensor_(params, 1.0, backend=name)
        gradclip.adaptive_clip_grad_(params, backend=name)
    for p, g, c in zip(params, fresh, copies):
        p.grad.copy_(g)
        c.grad = g.clone()
    graph.replay()
    want = gradclip.clip_grad_norm_per_tensor_(copies, 1.0, backend=name)
    gradclip.adaptive_clip_grad_(copies, backend=name)
    torch.testing.assert_close(norms, want)
    for p, c in zip(params, copies):
        torch.testing.assert_close(p.grad, c.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_per_tensor_and_agc_past_two_to_the_31_elements(name, gpu_memory_to_itself):
    """A bfloat16 gradient of more than 2**31 elements (4 GiB), among small ones: per-tensor
    norms, the per-tensor clip and AGC index it with 64-bit offsets and agree with the
    reference backend on the same GPU (its last row and last element weigh in)."""
    rows, width = (1 << 16) + 1, 1 << 15  # 2**31 + 2**15 elements, rows of 2**15
    gen = torch.Generator(device="cuda").manual_seed(0)

    def grads():
        big = torch.empty(rows, width, dtype=torch.bfloat16, device="cuda").normal_(generator=gen)
        big[-1, -1] = 300.0
        return [big, torch.randn(37, device="cuda", generator=gen)]

    torch.cuda.manual_seed(0)
    first = grads()
    norms = gradclip.backends.dispatch.tensor_norms(first, 2.0, name)
    want = gradclip.backends.dispatch.tensor_norms(first, 2.0, "reference")
    torch.testing.assert_close(norms, want, rtol=1e-4, atol=0)
    clipped = gradclip.backends.dispatch.clip_per_tensor_(first, 2.0, 1.0, name)
    torch.testing.assert_close(clipped, want, rtol=1e-4, atol=0)
    scale = (1.0 / (want[0] + 1e-6)).to(torch.float32)
    assert first[0][-1, -1].item() == pytest.approx(300.0 * scale.item(), rel=1e-2)
    del first, clipped
    weights = [torch.ones(rows, width, dtype=torch.bfloat16, device="cuda"),
               torch.ones(37, device="cuda")]
    ours, theirs = grads(), None
    theirs = [g.clone() for g in ours]
    result = gradclip.backends.dispatch.agc_(weights, ours, 0.01, 1e-3, 2.0, name)
    expected = gradclip.backends.dispatch.agc_(weights, theirs, 0.01, 1e-3, 2.0, "reference")
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(ours[0][-1], theirs[0][-1], rtol=1e-2, atol=0)
    torch.testing.assert_close(ours[1], theirs[1])
