"""gradclip.integrations.torchtitan: after patch(), torchtitan.distributed.utils.clip_grad_norm_
(what torchtitan's trainers call) clips with gradclip, with torchtitan's signature and
returned norm.

On 4 spawned gloo CPU ranks, on meshes built by torchtitan's own ParallelDims: FSDP2, HSDP,
FSDP2 + TP (strided shards), pipeline stages (``pp_mesh``) and expert parallelism
(``ep_enabled``, experts on their own 2-D mesh): each layout trained 3 steps with
torchtitan's clip and 3 with gradclip's, from the same seed (norms every step, final
weights), and the norms of orders 1 and inf compared on identical gradients. The harness
is tests/test_integrations_sharded.py's.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import sys
from pathlib import Path

import pytest
import torch

torchtitan = pytest.importorskip("torchtitan")
dist_utils = pytest.importorskip("torchtitan.distributed.utils")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_integrations_sharded import (  # noqa: E402
    MAX_NORM,
    MLP,
    WIDTH,
    batches,
    compare,
    full_weights,
    run_ranks,
)

import gradclip  # noqa: E402
import gradclip.functional  # noqa: E402
import gradclip.integrations.torchtitan as gradclip_titan  # noqa: E402
from gradclip.integrations import _common  # noqa: E402

TORCHTITANS_OWN = dist_utils.clip_grad_norm_


@pytest.fixture(autouse=True)
def unpatched(monkeypatch):
    monkeypatch.setattr(_common, "_announced", set())
    gradclip_titan.unpatch()
    yield
    gradclip_titan.unpatch()


# -- one process: the patch itself ---------------------------------------------------------------


def test_patch_replaces_what_the_trainers_call_and_unpatch_restores_it():
    gradclip_titan.patch()
    assert dist_utils.clip_grad_norm_ is gradclip_titan.clip_grad_norm_
    gradclip_titan.unpatch()
    assert dist_utils.clip_grad_norm_ is TORCHTITANS_OWN
    gradclip_titan.unpatch()  # not patched: nothing to do


def test_torchtitans_trainer_calls_the_function_on_the_module():
    """torchtitan.trainer does not import here (its torchdata dependency is not installed):
    read its source. It must call dist_utils.clip_grad_norm_, looked up at each step."""
    source = Path(importlib.util.find_spec("torchtitan.trainer").origin).read_text()
    assert "from torchtitan.distributed import full_dtensor, ParallelDims, utils as dist_utils" in source
    assert "dist_utils.clip_grad_norm_(" in source
    assert "import clip_grad_norm_" not in source


def test_a_module_that_imported_the_function_by_name_is_patched_too(monkeypatch):
    import torchtitan.distributed as holder

    monkeypatch.setattr(holder, "clip_grad_norm_", TORCHTITANS_OWN, raising=False)
    gradclip_titan.patch()
    assert holder.clip_grad_norm_ is gradclip_titan.clip_grad_norm_
    gradclip_titan.unpatch()
    assert holder.clip_grad_norm_ is TORCHTITANS_OWN


def test_plain_tensors_the_same_norm_and_gradients_as_torchtitan(caplog):
    def grads():
        generator = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.zeros(5, 3)), torch.nn.Parameter(torch.zeros(7))]
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        return params

    for norm_type in (2.0, 1.0, math.inf):
        theirs = grads()
        expected = dist_utils.clip_grad_norm_(theirs, 0.5, norm_type, foreach=True)
        gradclip_titan.patch(backend="reference")
        ours = grads()
        with caplog.at_level(logging.INFO, logger="gradclip"):
            norm = dist_utils.clip_grad_norm_(ours, 0.5, norm_type, foreach=True)
        gradclip_titan.unpatch()
        assert type(norm) is torch.Tensor
        assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.grad, b.grad)
    lines = [r.getMessage() for r in caplog.records if r.name == "gradclip"]
    assert len(lines) == 1 and "torchtitan" in lines[0] and "backend reference" in lines[0], lines


@pytest.mark.parametrize("backend,error", [("bogus", ValueError), ("cuda", gradclip.BackendUnavailableError)],
                         ids=["bogus", "cuda_without_a_gpu"])
def test_a_backend_that_cannot_run_is_refused_at_patch_time(backend, error):
    if backend == "cuda" and torch.cuda.is_available():
        pytest.skip("the cuda backend can run here")
    with pytest.raises(error, match=f"backend={backend!r}"):
        gradclip_titan.patch(backend=backend)
    assert not gradclip_titan.is_patched() and dist_utils.clip_grad_norm_ is TORCHTITANS_OWN


def test_a_changed_signature_or_version_is_refused(monkeypatch):
    def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None,
                        pp_mesh=None, ep_enabled=False, something_new=None):
        raise AssertionError("not called")

    monkeypatch.setattr(dist_utils, "clip_grad_norm_", clip_grad_norm_)
    with pytest.raises(RuntimeError, match="not supported"):
        gradclip_titan.patch()
    monkeypatch.undo()
    real_version = _common.metadata.version
    monkeypatch.setattr(_common.metadata, "version",
                        lambda name: "0.4.0" if name == "torchtitan" else real_version(name))
    with pytest.raises(RuntimeError, match="supports torchtitan >= 0.3.0, < 0.4; 0.4.0 is installed"):
        gradclip_titan.patch()
    assert not gradclip_titan.is_patched()


# -- 4 ranks: torchtitan's layouts -----------------------------------------------------------------


class Experts(torch.nn.Module):
    """Four experts' weights, stacked (torchtitan's grouped experts)."""

    def __init__(self, count: int = 4):
        super().__init__()
        self.w1 = torch.nn.Parameter(0.1 * torch.randn(count, WIDTH, 2 * WIDTH))
        self.w2 = torch.nn.Parameter(0.1 * torch.randn(count, 2 * WIDTH, WIDTH))


class MoE(torch.nn.Module):
    """A dense router and expert-parallel experts. Each rank runs its tokens through its
    own experts (a stand-in for the token all-to-all: the gradients' layout is what counts)."""

    def __init__(self):
        super().__init__()
        self.router = torch.nn.Linear(WIDTH, WIDTH)
        self.experts = Experts()

    def forward(self, x):
        h = self.router(x)
        w1, w2 = (w.to_local() if hasattr(w, "to_local") else w for w in (self.experts.w1, self.experts.w2))
        hidden = torch.einsum("bw,ewh->beh", h, w1).relu()
        return h + torch.einsum("beh,ehw->bw", hidden, w2)


def titan_meshes(world: int, **degrees):
    """torchtitan's own meshes (ParallelDims), on the CPU."""
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  (size-1 dimensions: the "fake" backend)
    import torchtitan.distributed.parallel_dims as parallel_dims

    parallel_dims.device_type = "cpu"  # torchtitan assumes "cuda" when it finds no accelerator
    dims = dict(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1)
    dims.update(degrees)
    layout = parallel_dims.ParallelDims(**dims, world_size=world, spmd_backend="partial_dtensor")
    layout.build_mesh()
    return layout


def build(layout_name: str, dims):
    """The model on torchtitan's meshes as torchtitan lays it out; the seed of its data;
    pp_mesh; ep_enabled."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    pp_mesh = dims.get_optional_mesh("pp")
    stage = 0 if pp_mesh is None else pp_mesh.get_local_rank()
    torch.manual_seed(stage)  # pipeline stages hold layers of their own
    dp_names = ["dp_replicate", "fsdp"] if dims.dp_replicate_enabled else ["fsdp"]
    dp_mesh = dims.get_mesh(dp_names)
    if layout_name == "ep":
        model = MoE()
        ep_mesh, efsdp_mesh = dims.get_mesh("ep"), dims.get_mesh("efsdp")
        for name in ("w1", "w2"):
            full = getattr(model.experts, name)
            setattr(model.experts, name, torch.nn.Parameter(distribute_tensor(full.detach(), ep_mesh, [Shard(0)])))
        fully_shard(model.experts, mesh=efsdp_mesh)
    else:
        model = MLP()
        if dims.tp_enabled:
            parallelize_module(model, dims.get_mesh("tp"), {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(model.up, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    strided = model.experts.w1 if layout_name == "ep" else model.up.weight if dims.tp_enabled else None
    if strided is not None:  # FSDP2 over TP or EP: the layout issue 19 was about
        assert type(strided.placements[0]).__name__ == "_StridedShard", strided.placements
    if layout_name == "ep":
        assert model.experts.w1.device_mesh.mesh_dim_names == ("efsdp", "ep")
    batch = dims.get_optional_mesh("batch")
    seed = 100 * stage + (0 if batch is None else batch.get_local_rank())
    return model, seed, pp_mesh, dims.ep_enabled


def titan_run(layout_name: str, dims):
    """STEPS steps, clipping with whatever dist_utils.clip_grad_norm_ is, called as
    torchtitan's trainer calls it. Returns the norms and the final weights."""
    import torchtitan.distributed.utils as utils

    model, seed, pp_mesh, ep_enabled = build(layout_name, dims)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    norms = []
    for x, y in batches(seed, WIDTH):
        torch.nn.functional.mse_loss(model(x), y).backward()
        norm = utils.clip_grad_norm_(list(model.parameters()), MAX_NORM, foreach=True,
                                     pp_mesh=pp_mesh, ep_enabled=ep_enabled)
        assert type(norm) is torch.Tensor, type(norm)
        norms.append(norm.item())
        optimizer.step()
        optimizer.zero_grad()
    return norms, full_weights(model)


def other_norm_types(layout_name: str, dims, name: str) -> None:
    """Norms of order 1 and inf, and the clipped gradients, on identical gradients."""
    import torchtitan.distributed.utils as utils

    for norm_type in (1.0, math.inf):
        results = []
        for patched in (False, True):
            if patched:
                gradclip_titan.patch()
            model, seed, pp_mesh, ep_enabled = build(layout_name, dims)
            x, y = batches(seed, WIDTH, count=1)[0]
            torch.nn.functional.mse_loss(model(x), y).backward()
            norm = utils.clip_grad_norm_(list(model.parameters()), MAX_NORM, norm_type, foreach=True,
                                         pp_mesh=pp_mesh, ep_enabled=ep_enabled)
            results.append((norm.item(), [p.grad.full_tensor() for p in model.parameters()]))
            gradclip_titan.unpatch()
        (theirs, their_grads), (ours, our_grads) = results
        assert math.isclose(theirs, ours, rel_tol=1e-5), f"{name} p={norm_type}: {theirs} vs {ours}"
        for a, b in zip(their_grads, our_grads):
            torch.testing.assert_close(b, a, msg=f"{name} p={norm_type}")


LAYOUTS = {
    "FSDP2 (dp_shard=4)": ("mlp", dict(dp_shard=4)),
    "HSDP (dp_replicate=2, dp_shard=2)": ("mlp", dict(dp_replicate=2, dp_shard=2)),
    "FSDP2 + TP (dp_shard=2, tp=2)": ("mlp", dict(dp_shard=2, tp=2)),
    "pipeline stages (pp=2, dp_shard=2; pp_mesh)": ("mlp", dict(pp=2, dp_shard=2)),
    "expert parallel (dp_shard=4, ep=2; ep_enabled)": ("ep", dict(dp_shard=4, ep=2)),
}


def torchtitan_layouts(rank: int, world: int) -> dict:
    rows = {}
    for name, (model_name, degrees) in LAYOUTS.items():
        dims = titan_meshes(world, **degrees)
        theirs, theirs_w = titan_run(model_name, dims)
        gradclip_titan.patch()
        try:
            ours, ours_w = titan_run(model_name, dims)
        finally:
            gradclip_titan.unpatch()
        compare(f"torchtitan, {name}", theirs, ours, theirs_w, ours_w, rows)
        other_norm_types(model_name, dims, name)
    return rows


@pytest.mark.slow
def test_torchtitan_layouts_fsdp2_hsdp_tp_pipeline_and_experts():
    rows = run_ranks(__name__, "torchtitan_layouts", world=4)
    assert len(rows) == len(LAYOUTS)


DOCS = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
EXAMPLES = [block for block in re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
            if "gradclip.integrations.torchtitan" in block]


def test_the_docs_show_torchtitan():
    assert any("patch()" in code and "dist_utils.clip_grad_norm_" in code for code in EXAMPLES)


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example-{i}" for i in range(len(EXAMPLES))])
def test_documented_example_runs(code, monkeypatch):
    calls = []
    original = gradclip.functional.clip_grad_norm_
    monkeypatch.setattr(gradclip.functional, "clip_grad_norm_", lambda *a, **k: calls.append(1) or original(*a, **k))
    exec(compile(code, str(DOCS), "exec"), {"__name__": "__example__"})
    assert calls and not gradclip_titan.is_patched(), "the example clips with gradclip, then unpatches"
