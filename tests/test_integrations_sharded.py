"""The integrations on sharded gradients, on spawned gloo CPU ranks: Accelerate (FSDP2 and
DTensor gradients, the Trainer's mixed-mesh norm), Lightning's ModelParallelStrategy in the
Trainer and in Fabric (FSDP2, tensor parallelism, both), and the multi-rank examples of
docs/integrations.md. torchtitan: tests/test_integrations_torchtitan.py, same harness.

Each test spawns its ranks once and runs every case of its framework in them, each case
twice from the same seed: with the framework's own clipping, then with gradclip's. Every
rank checks the norms (every step) and the final weights, and rank 0 writes the largest
differences to ``rows.json`` (printed with ``pytest -s``: the numbers of the docs' table).
A run that does not finish within its deadline fails (a rank stuck in a collective must
not hang CI).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

DEADLINE_S = 300
ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "integrations.md"


# -- the harness (also used by test_integrations_torchtitan.py) -----------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_launcher_env(rank: int, world: int, port: int) -> None:
    """What torchrun sets: Accelerate and Lightning read it to find their rank (the
    process group itself already exists, so they do not start one)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      GROUP_RANK="0", NODE_RANK="0")


def _worker(rank: int, world: int, folder: str, port: int, module: str, scenario: str) -> None:
    import importlib

    set_launcher_env(rank, world, port)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    try:
        rows = getattr(importlib.import_module(module), scenario)(rank, world)
        if rank == 0:
            Path(folder, "rows.json").write_text(json.dumps(rows or {}, indent=1))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # FSDP2 over gloo sometimes aborts at exit, after all the work (TOOLCHAIN.md): the
    # marker tells such an abort from a failure during the work.
    Path(folder, f"done{rank}").touch()


def run_ranks(module: str, scenario: str, world: int) -> dict:
    """Run ``module.scenario(rank, world)`` on ``world`` spawned gloo ranks; fail on an
    error or past the deadline. Returns rank 0's rows."""
    with tempfile.TemporaryDirectory() as folder:
        context = torch.multiprocessing.start_processes(
            _worker, args=(world, folder, _free_port(), module, scenario), nprocs=world,
            join=False, start_method="spawn")
        deadline = time.monotonic() + DEADLINE_S
        try:
            while not context.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    for process in context.processes:
                        if process.is_alive():
                            process.kill()
                    pytest.fail(f"{scenario} on {world} ranks did not finish in {DEADLINE_S} s "
                                "(a rank is stuck in a collective)")
        except torch.multiprocessing.ProcessExitedException:
            if not all(Path(folder, f"done{rank}").exists() for rank in range(world)):
                raise  # died during the work
        rows = json.loads(Path(folder, "rows.json").read_text())
    print(f"\n{scenario}: gradclip's run against the framework's own run (max abs difference)")
    for name, row in rows.items():
        print(f"  {name}: norm {row['norm']:.3g} (of ~{row['norm_scale']:.3g}), "
              f"final weights {row['weights']:.3g}, {row['steps']} steps")
    return rows


# -- what the ranks share ---------------------------------------------------------------------


STEPS = 3
MAX_NORM = 0.05  # small enough that every step clips (checked)


class Recorder:
    """Wraps functions to count their calls and keep what they return; restores them."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.returned: dict[str, list] = {}
        self._restore: list = []

    def watch(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)
        self.calls[label], self.returned[label] = 0, []

        def counted(*args, **kwargs):
            self.calls[label] += 1
            result = original(*args, **kwargs)
            self.returned[label].append(result)
            return result

        setattr(owner, name, counted)
        self._restore.append((owner, name, original))

    def reset(self) -> None:
        for label in self.calls:
            self.calls[label], self.returned[label] = 0, []

    def restore(self) -> None:
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._restore.clear()


@contextlib.contextmanager
def watching_clips():
    import gradclip.functional

    recorder = Recorder()
    recorder.watch(gradclip.functional, "clip_grad_norm_", "gradclip norm")
    recorder.watch(gradclip.functional, "clip_grad_value_", "gradclip value")
    recorder.watch(torch.nn.utils, "clip_grad_norm_", "torch norm")
    recorder.watch(torch.nn.utils, "get_total_norm", "torch total norm")
    recorder.watch(torch.nn.utils, "clip_grad_value_", "torch value")
    try:
        yield recorder
    finally:
        recorder.restore()


def value_of(norm) -> float:
    """A returned norm as a float: torch's DTensor norm is partial (full_tensor() reduces it)."""
    full_tensor = getattr(norm, "full_tensor", None)
    return float(norm if full_tensor is None else full_tensor())


def full_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter in full (a collective for DTensors: every rank calls it)."""
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone().float()
            for p in module.parameters()]


def compare(name: str, theirs: list[float], ours: list[float], their_weights, our_weights,
            rows: dict, rtol: float = 1e-5) -> None:
    """Check gradclip's run against the framework's (norms every step, final weights) and
    record the largest differences in ``rows``."""
    assert len(theirs) == len(ours) == STEPS, (name, theirs, ours)
    assert min(theirs) > MAX_NORM, f"{name}: every step must clip ({theirs})"
    for step, (a, b) in enumerate(zip(theirs, ours)):
        assert math.isclose(a, b, rel_tol=rtol), f"{name} step {step}: framework {a!r}, gradclip {b!r}"
    weight_diff = max(float((a - b).abs().max()) for a, b in zip(their_weights, our_weights))
    for a, b in zip(their_weights, our_weights):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
    rows[name] = {"norm": max(abs(a - b) for a, b in zip(theirs, ours)),
                  "norm_scale": max(theirs), "weights": weight_diff, "steps": STEPS}


def batches(seed: int, width: int, count: int = STEPS, size: int = 8):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, width, generator=generator), 4 * torch.randn(size, width, generator=generator))
            for _ in range(count)]


# -- Lightning: ModelParallelStrategy in the Trainer and in Fabric ------------------------------


WIDTH = 16


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(WIDTH, 2 * WIDTH)
        self.down = torch.nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def parallelize(module: MLP, mesh, layout: str) -> MLP:
    """FSDP2 over ``mesh``'s data-parallel dimension, tensor parallelism (column- then
    row-wise) over its tensor-parallel one, or both (FSDP2 on top of TP: the strided
    shards of torchtitan's layout)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    dp, tp = mesh["data_parallel"], mesh["tensor_parallel"]
    if "tp" in layout:
        parallelize_module(module, tp, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    if "fsdp2" in layout:
        fully_shard(module.up, mesh=dp)
        fully_shard(module, mesh=dp)
    return module


LAYOUTS = ("fsdp2", "tp", "fsdp2+tp")


def lightning_trainer_run(layout: str, callbacks: list, world: int, precision: str = "32-true"):
    """STEPS steps of ModelParallelStrategy on a 2 x (world/2) mesh; returns the norms
    clipped (the framework's or gradclip's, whichever clipped) and the final weights."""
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    class Parallel(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = MLP()

        def configure_model(self):
            parallelize(self.net, self.device_mesh, layout)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    os.environ["WORLD_SIZE"] = str(world)  # Lightning's environment removes it at teardown
    torch.manual_seed(0)
    model = Parallel()
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*map(torch.cat, zip(*batches(1, WIDTH, 2 * STEPS)))), batch_size=8)
    trainer = L.Trainer(accelerator="cpu", devices=world, max_steps=STEPS, precision=precision,
                        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=world // 2),
                        gradient_clip_val=MAX_NORM, callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=True)
    trainer.fit(model, data)
    return full_weights(model.net)


def fabric_run(layout: str, callbacks: list, world: int, precision: str = "32-true"):
    """STEPS steps of Fabric with ModelParallelStrategy on a 2 x (world/2) mesh, or DDP
    (``layout="ddp"``); returns the norms fabric.clip_gradients returned and the final weights."""
    import lightning as L
    from lightning.fabric.strategies import ModelParallelStrategy

    os.environ["WORLD_SIZE"] = str(world)
    strategy = "ddp" if layout == "ddp" else ModelParallelStrategy(
        lambda m, mesh: parallelize(m, mesh, layout), data_parallel_size=2, tensor_parallel_size=world // 2)
    fabric = L.Fabric(accelerator="cpu", devices=world, precision=precision, callbacks=callbacks,
                      strategy=strategy)
    fabric.launch()
    torch.manual_seed(0)
    model = fabric.setup(MLP())
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2))
    dp_rank = (fabric.global_rank if layout == "ddp"
               else fabric.strategy.device_mesh["data_parallel"].get_local_rank())
    norms = []
    for x, y in batches(10 + dp_rank, WIDTH):
        fabric.backward(torch.nn.functional.mse_loss(model(x), y))
        norms.append(value_of(fabric.clip_gradients(model, optimizer, max_norm=MAX_NORM)))
        optimizer.step()
        optimizer.zero_grad()
    return norms, full_weights(model)


def lightning_layouts(rank: int, world: int) -> dict:
    """The Trainer's callback and Fabric's, on FSDP2, TP and FSDP2 + TP, against
    Lightning's own clipping (torch's clip of the DTensor gradients)."""
    from gradclip.integrations.fabric import FabricGradientClipping
    from gradclip.integrations.lightning import FusedGradientClipping

    rows = {}
    for layout in LAYOUTS:
        with watching_clips() as recorder:
            theirs_w = lightning_trainer_run(layout, [], world)
            theirs = [value_of(n) for n in recorder.returned["torch norm"]]
            assert recorder.calls["gradclip norm"] == 0
            recorder.reset()
            callback = FusedGradientClipping()
            ours_w = lightning_trainer_run(layout, [callback], world)
            ours = [value_of(n) for n in recorder.returned["gradclip norm"]]
            assert recorder.calls["torch norm"] == 0
        assert callback.last_norm.item() == ours[-1]
        compare(f"Lightning Trainer, ModelParallelStrategy, {layout}", theirs, ours, theirs_w, ours_w, rows)

        with watching_clips() as recorder:
            theirs, theirs_w = fabric_run(layout, [], world)
            assert recorder.calls["gradclip norm"] == 0 and recorder.calls["torch norm"] == STEPS
            ours, ours_w = fabric_run(layout, [FabricGradientClipping()], world)
            assert recorder.calls["gradclip norm"] == STEPS and recorder.calls["torch norm"] == STEPS
        compare(f"Fabric, ModelParallelStrategy, {layout}", theirs, ours, theirs_w, ours_w, rows)

    with watching_clips() as recorder:
        theirs, theirs_w = fabric_run("ddp", [], world)
        ours, ours_w = fabric_run("ddp", [FabricGradientClipping()], world)
        assert recorder.calls["gradclip norm"] == STEPS and recorder.calls["torch norm"] == STEPS
    compare("Fabric, DDP", theirs, ours, theirs_w, ours_w, rows)

    with watching_clips() as recorder:
        theirs, theirs_w = fabric_run("fsdp2+tp", [], world, "bf16-mixed")
        ours, ours_w = fabric_run("fsdp2+tp", [FabricGradientClipping()], world, "bf16-mixed")
        assert recorder.calls["gradclip norm"] == STEPS
    compare("Fabric, ModelParallelStrategy, fsdp2+tp, bf16-mixed", theirs, ours, theirs_w, ours_w, rows)
    return rows


@pytest.mark.slow
def test_lightning_trainer_and_fabric_model_parallel_fsdp2_tp_and_both():
    rows = run_ranks(__name__, "lightning_layouts", world=4)
    assert len(rows) == 2 * len(LAYOUTS) + 2


# -- Accelerate and the Hugging Face Trainer -----------------------------------------------------


@contextlib.contextmanager
def accelerator_told(fsdp2: bool):
    """Make Accelerators report FSDP2, as they do on GPUs with the FSDP plugin (on the CPU
    Accelerate ignores the plugin: MULTI_CPU, DDP)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    saved = {name: Accelerator.__dict__[name] for name in ("distributed_type", "is_fsdp2")}
    if fsdp2:
        Accelerator.distributed_type = property(lambda self: DistributedType.FSDP)
        Accelerator.is_fsdp2 = property(lambda self: True)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(Accelerator, name, value)


def accelerate_run(mesh, rank: int, clip, fsdp2_plugin: bool):
    """A plain Accelerate loop over an MLP: fully_shard-ed over ``mesh`` (DTensor
    gradients), or prepared by Accelerate (DDP) when ``mesh`` is None; ``clip`` clips
    through the Accelerator. Returns the clip results and the final weights."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import fully_shard

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    assert accelerator.distributed_type == DistributedType.MULTI_CPU
    torch.manual_seed(0)
    model = MLP()
    if mesh is None:
        model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    else:
        fully_shard(model.up, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=1e-2))
        accelerator._models.append(model)  # what prepare(model) records under FSDP
    results = []
    with accelerator_told(fsdp2_plugin):
        for x, y in batches(20 + rank, WIDTH):
            accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            results.append(clip(accelerator, model))
            optimizer.step()
            optimizer.zero_grad()
    return results, full_weights(model)


def trainer_mixed_mesh_run(rank: int, world: int, two_meshes: bool):
    """A transformers Trainer's own clip (Trainer._clip_grad_norm, what its training loop
    calls) on a tiny Llama whose decoder layers are fully_shard-ed over one mesh and the
    rest over another (as with tensor parallelism plus FSDP2, or experts): transformers 5
    then measures in Trainer._mixed_mesh_grad_norm; with one mesh, in Accelerate."""
    import transformers
    from accelerate.state import AcceleratorState, GradientState
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      hidden_size=32, intermediate_size=64, vocab_size=64,
                                      max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(config)
    layers_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    rest_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)) if two_meshes else layers_mesh
    for layer in model.model.layers:
        fully_shard(layer, mesh=layers_mesh)
    fully_shard(model, mesh=rest_mesh)
    with tempfile.TemporaryDirectory() as output_dir:
        args = transformers.TrainingArguments(output_dir=output_dir, use_cpu=True, max_grad_norm=MAX_NORM,
                                              report_to=[], save_strategy="no", disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 64, (STEPS, 4, 16), generator=torch.Generator().manual_seed(30 + rank))
    norms = []
    for ids in tokens:
        model(input_ids=ids, labels=ids).loss.backward()
        norms.append(float(trainer._clip_grad_norm(model)))
        if hasattr(trainer, "_has_mixed_mesh_grads"):  # transformers 5
            assert trainer._has_mixed_mesh_grads(model) == two_meshes
        optimizer.step()
        optimizer.zero_grad()
    return norms, full_weights(model)


def hugging_face(rank: int, world: int) -> dict:
    """Accelerate's clip_grad_norm_/clip_grad_value_ on DTensor gradients (by hand, and as
    the FSDP2 plugin gives them) and the Trainer's own clip, against Accelerate's and
    transformers' own code (torch's clip, _clip_grad_norm_dtensor_aware, the Trainer's
    _mixed_mesh_grad_norm)."""
    import gradclip.integrations.huggingface as gradclip_hf
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    rows = {}

    def by_norm(accelerator, model):
        norm = accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)
        assert type(norm) is torch.Tensor or not gradclip_hf.is_patched(), type(norm)
        return value_of(norm)

    def by_value(accelerator, model):
        accelerator.clip_grad_value_(model.parameters(), 0.01)

    for layout_mesh, fsdp2_plugin, name in (
            (None, False, "Accelerate loop, DDP (MULTI_CPU)"),
            (mesh, False, "Accelerate loop, fully_shard by hand (MULTI_CPU)"),
            (mesh, True, "Accelerate loop, FSDP2 plugin (distributed_type FSDP)")):
        with watching_clips() as recorder:
            theirs, theirs_w = accelerate_run(layout_mesh, rank, by_norm, fsdp2_plugin)
            assert recorder.calls["gradclip norm"] == 0
            with gradclip_hf.patched():
                ours, ours_w = accelerate_run(layout_mesh, rank, by_norm, fsdp2_plugin)
            assert recorder.calls["gradclip norm"] == STEPS
        compare(name, theirs, ours, theirs_w, ours_w, rows)

    with watching_clips() as recorder:
        _, theirs_w = accelerate_run(mesh, rank, by_value, False)
        with gradclip_hf.patched():
            _, ours_w = accelerate_run(mesh, rank, by_value, False)
        assert recorder.calls["gradclip value"] == STEPS and recorder.calls["torch value"] == STEPS
    for a, b in zip(theirs_w, ours_w):
        torch.testing.assert_close(b, a, msg="clip_grad_value_")

    for two_meshes, name in ((False, "HF Trainer._clip_grad_norm, FSDP2 on one mesh"),
                             (True, "HF Trainer._clip_grad_norm, FSDP2 on two meshes (_mixed_mesh_grad_norm)")):
        with watching_clips() as recorder:
            theirs, theirs_w = trainer_mixed_mesh_run(rank, world, two_meshes)
            assert recorder.calls["gradclip norm"] == 0
            with gradclip_hf.patched():
                ours, ours_w = trainer_mixed_mesh_run(rank, world, two_meshes)
            assert recorder.calls["gradclip norm"] == STEPS
        compare(name, theirs, ours, theirs_w, ours_w, rows)
    return rows


@pytest.mark.slow
def test_hugging_face_fsdp2_dtensor_gradients_and_the_trainers_mixed_mesh_norm():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    rows = run_ranks(__name__, "hugging_face", world=2)
    assert len(rows) == 5


# -- the examples of docs/integrations.md ---------------------------------------------------------


def docs_blocks(kind: str) -> list[str]:
    """The ```python blocks (one process) or ```py blocks (several ranks) of the docs."""
    return re.findall(rf"```{kind}\n(.*?)```", DOCS.read_text(), flags=re.S)


def documented_examples(rank: int, world: int) -> dict:
    """Every multi-rank example of docs/integrations.md, as torchrun would run it."""
    from accelerate.state import AcceleratorState, GradientState

    for code in docs_blocks("py"):
        os.environ["WORLD_SIZE"] = str(world)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        with watching_clips() as recorder, contextlib.redirect_stdout(io.StringIO()):
            exec(compile(code, str(DOCS), "exec"), {"__name__": "__example__"})
        assert recorder.calls["gradclip norm"] >= 1, code
        assert recorder.calls["torch norm"] == recorder.calls["torch total norm"] == 0, code
        dist.barrier()
    return {}


@pytest.mark.slow
def test_documented_multi_rank_examples_run():
    pytest.importorskip("accelerate")
    pytest.importorskip("lightning")
    pytest.importorskip("torchtitan")
    assert len(docs_blocks("py")) == 4, "Accelerate, Lightning, Fabric and torchtitan"
    run_ranks(__name__, "documented_examples", world=2)


INTEGRATIONS = ("gradclip.integrations.huggingface", "gradclip.integrations.lightning",
                "gradclip.integrations.fabric", "gradclip.integrations.torchtitan")


def test_every_one_process_example_is_run_by_a_test():
    """test_integrations_{hf,lightning,fabric,torchtitan}.py each run the ```python blocks
    that use their integration; a block that uses none is run here."""
    for code in docs_blocks("python"):
        used = [name for name in INTEGRATIONS if name in code]
        assert len(used) <= 1, used
        if used:
            continue
        import logging
        import warnings

        level = logging.getLogger("gradclip").level
        try:
            with warnings.catch_warnings():
                exec(compile(code, str(DOCS), "exec"), {"__name__": "__example__"})
        finally:
            logging.getLogger("gradclip").setLevel(level)

