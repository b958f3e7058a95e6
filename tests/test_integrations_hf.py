"""gradclip.integrations.huggingface: the Trainer and Accelerate loops clip with gradclip,
log the same grad_norm and end with the same weights as Accelerate's own clipping.

Tiny models built from a config, random tokens, the CPU; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

import gradclip  # noqa: E402
import gradclip.functional  # noqa: E402
from gradclip.integrations import FrameworkClipsWarning, _common  # noqa: E402
from gradclip.integrations import huggingface as gradclip_hf  # noqa: E402

MAX_STEPS = 4
# Small enough that every step of these runs clips (the tests check that it does).
MAX_GRAD_NORM = 0.1
ORIGINAL_CLIP_GRAD_NORM = Accelerator.__dict__["clip_grad_norm_"]
ORIGINAL_CLIP_GRAD_VALUE = Accelerator.__dict__["clip_grad_value_"]


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Each test starts unpatched, with Accelerate's process-wide state reset and no
    integration notice given yet."""
    monkeypatch.setattr(_common, "_announced", set())
    monkeypatch.setattr(_common, "_warned", set())
    if gradclip_hf.is_patched():
        gradclip_hf.unpatch()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    if gradclip_hf.is_patched():
        gradclip_hf.unpatch()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


class CallCounter:
    """Replaces functions by wrappers that count calls and keep what they return."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, int] = {}
        self.returned: dict[str, list] = {}
        self.backends: dict[str, list] = {}
        self._monkeypatch = monkeypatch

    def watch(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)
        self.calls[label], self.returned[label], self.backends[label] = 0, [], []

        def counted(*args, **kwargs):
            self.calls[label] += 1
            self.backends[label].append(kwargs.get("backend"))
            result = original(*args, **kwargs)
            self.returned[label].append(result)
            return result

        self._monkeypatch.setattr(owner, name, counted)


@pytest.fixture
def counter(monkeypatch) -> CallCounter:
    """Counts gradclip's and torch's clipping functions (Accelerate imports torch's at call time)."""
    counter = CallCounter(monkeypatch)
    counter.watch(gradclip.functional, "clip_grad_norm_", "gradclip norm")
    counter.watch(gradclip.functional, "clip_grad_value_", "gradclip value")
    counter.watch(torch.nn.utils, "get_total_norm", "torch norm")
    counter.watch(torch.nn.utils, "clip_grad_norm_", "torch clip norm")
    counter.watch(torch.nn.utils, "clip_grad_value_", "torch value")
    return counter


def torch_norm_calls(counter: CallCounter) -> int:
    """Calls of torch's norm: Accelerate >= 1.x calls get_total_norm or clip_grad_norm_."""
    return counter.calls["torch norm"] + counter.calls["torch clip norm"]


def torch_calls(counter: CallCounter) -> int:
    return torch_norm_calls(counter) + counter.calls["torch value"]


def tiny_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      hidden_size=32, intermediate_size=64, vocab_size=64,
                                      max_position_embeddings=16)
    return transformers.LlamaForCausalLM(config)


def token_dataset(n: int = MAX_STEPS * 8, length: int = 16) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row} for row in ids]


def train(kind: str, bf16: bool, tmp_path) -> tuple[list[float], dict[str, torch.Tensor]]:
    """A Trainer run; returns the logged grad_norm of every step and the final weights."""
    model = tiny_model(kind)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, bf16=bf16, max_steps=MAX_STEPS,
        per_device_train_batch_size=8, learning_rate=1e-2, max_grad_norm=MAX_GRAD_NORM,
        logging_steps=1, report_to=[], save_strategy="no", seed=0, disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=token_dataset())
    trainer.train()
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    return logged, {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same_weights(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        # The norms may differ in the last bit (gradclip sums the per-tensor norms in
        # another order), so the clip factor and the weights may too.
        torch.testing.assert_close(actual[name], expected[name], msg=name)


@pytest.mark.parametrize("kind,bf16", [("gpt2", False), ("llama", True)], ids=["gpt2-fp32", "llama-bf16"])
def test_trainer_logs_the_same_grad_norm_and_weights(kind, bf16, tmp_path, counter):
    expected_norms, expected_weights = train(kind, bf16, tmp_path)
    assert counter.calls["gradclip norm"] == 0
    assert torch_calls(counter) >= MAX_STEPS
    assert len(expected_norms) == MAX_STEPS
    assert min(expected_norms) > MAX_GRAD_NORM, "the run must clip at every step"

    gradclip_hf.patch()
    counter.calls["torch norm"] = counter.calls["torch clip norm"] = 0
    norms, weights = train(kind, bf16, tmp_path)

    assert counter.calls["gradclip norm"] == MAX_STEPS
    assert torch_calls(counter) == 0
    assert norms == pytest.approx(expected_norms, rel=1e-6)
    assert_same_weights(expected_weights, weights)


def test_unpatch_restores_accelerates_clipping(tmp_path, counter):
    gradclip_hf.patch()
    assert Accelerator.__dict__["clip_grad_norm_"] is gradclip_hf.clip_grad_norm_
    gradclip_hf.unpatch()

    assert not gradclip_hf.is_patched()
    assert Accelerator.__dict__["clip_grad_norm_"] is ORIGINAL_CLIP_GRAD_NORM
    assert Accelerator.__dict__["clip_grad_value_"] is ORIGINAL_CLIP_GRAD_VALUE
    train("gpt2", False, tmp_path)
    assert counter.calls["gradclip norm"] == 0
    assert torch_calls(counter) >= MAX_STEPS


def test_patched_block_restores_on_exit(counter):
    with gradclip_hf.patched():
        assert gradclip_hf.is_patched()
    assert Accelerator.__dict__["clip_grad_norm_"] is ORIGINAL_CLIP_GRAD_NORM

    gradclip_hf.patch(backend="auto")
    with gradclip_hf.patched():
        pass
    assert gradclip_hf.is_patched(), "a patch in force before the block stays after it"


def test_patching_twice_then_unpatching_restores_accelerate():
    gradclip_hf.patch()
    gradclip_hf.patch()
    gradclip_hf.unpatch()
    assert Accelerator.__dict__["clip_grad_norm_"] is ORIGINAL_CLIP_GRAD_NORM
    gradclip_hf.unpatch()  # not patched: nothing to do


def test_unpatch_refuses_to_drop_a_later_replacement(monkeypatch):
    gradclip_hf.patch()

    def someone_elses(self, parameters, max_norm, norm_type=2):
        raise AssertionError("not called")

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", someone_elses)
    with pytest.raises(RuntimeError, match="replaced by something else"):
        gradclip_hf.unpatch()
    assert gradclip_hf.is_patched()
    monkeypatch.undo()
    gradclip_hf.unpatch()
    assert Accelerator.__dict__["clip_grad_norm_"] is ORIGINAL_CLIP_GRAD_NORM


def accelerate_loop(clip, scaler: torch.amp.GradScaler | None = None, steps: int = 3, device: str = "cpu"):
    """A plain Accelerate loop over a small MLP; ``clip(accelerator, model)`` clips."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="fp16" if scaler is not None else "no")
    if scaler is not None:
        # Accelerate turns fp16 AMP off on the CPU; give it torch's CPU scaler, so that
        # the loss is scaled and unscale_gradients() has work to do, as on a GPU.
        accelerator.native_amp, accelerator.scaler = True, scaler
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(1)
    results = []
    for _ in range(steps):
        x = torch.randn(16, 16, generator=generator).to(accelerator.device)
        y = 10 * torch.randn(16, 1, generator=generator).to(accelerator.device)
        loss = torch.nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        results.append(clip(accelerator, model))
        optimizer.step()
        optimizer.zero_grad()
    return results, [p.detach().clone() for p in model.parameters()]


def clip_norm(accelerator, model):
    return accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)


def clip_value(accelerator, model):
    return accelerator.clip_grad_value_(model.parameters(), 0.05)


def test_each_backend_clips_the_accelerate_loop_as_accelerate_does(backend_device, counter):
    backend, device = backend_device
    expected_norms, expected = accelerate_loop(clip_norm, device=device)
    AcceleratorState._reset_state(True)
    gradclip_hf.patch(backend=backend)
    norms, weights = accelerate_loop(clip_norm, device=device)

    assert counter.backends["gradclip norm"] == [backend] * 3
    assert min(n.item() for n in norms) > MAX_GRAD_NORM
    assert [n.item() for n in norms] == pytest.approx([n.item() for n in expected_norms], rel=1e-6)
    for want, got in zip(expected, weights):
        torch.testing.assert_close(got, want)


def test_accelerator_clip_grad_value_matches(counter):
    _, expected = accelerate_loop(clip_value)
    assert counter.calls["torch value"] == 3
    gradclip_hf.patch()
    _, weights = accelerate_loop(clip_value)
    assert counter.calls["gradclip value"] == 3
    assert counter.calls["torch value"] == 3
    for want, got in zip(expected, weights):
        torch.testing.assert_close(got, want)


def test_fp16_scaler_unscales_before_gradclip(counter):
    unscaled_norms, _ = accelerate_loop(clip_norm)
    AcceleratorState._reset_state(True)
    expected_norms, expected = accelerate_loop(clip_norm, torch.amp.GradScaler("cpu", init_scale=2.0**12))
    gradclip_hf.patch()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    norms, weights = accelerate_loop(clip_norm, scaler)

    assert counter.calls["gradclip norm"] == 3
    # The norm is that of the unscaled gradients: unscale_gradients() ran first.
    assert [n.item() for n in norms] == pytest.approx([n.item() for n in expected_norms], rel=1e-6)
    assert min(n.item() for n in norms) > MAX_GRAD_NORM
    # fp16 autocast changes the gradients a little; a scaled norm would be 4096 times larger.
    assert norms[0].item() == pytest.approx(unscaled_norms[0].item(), rel=1e-3)
    assert scaler.get_scale() == 2.0**12, "no inf/NaN step: the scale has not backed off"
    for want, got in zip(expected, weights):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("distributed_type", ["FSDP", "XLA", "MEGATRON_LM"])
def test_layouts_gradclip_does_not_clip_go_to_accelerate(distributed_type, monkeypatch, counter):
    """FSDP, XLA and the like keep Accelerate's own code; here each falls through to its
    generic path, which calls torch."""
    gradclip_hf.patch()
    monkeypatch.setattr(Accelerator, "distributed_type",
                        property(lambda self: DistributedType[distributed_type]))
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    model(torch.randn(2, 4)).sum().backward()
    with pytest.warns(FrameworkClipsWarning, match=WHY_ACCELERATE_CLIPS[distributed_type]):
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
    assert counter.calls["gradclip norm"] == 0
    assert torch_norm_calls(counter) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accelerator.clip_grad_norm_(model.parameters(), 1.0)  # the same reason: warned once
    assert torch_norm_calls(counter) == 2


WHY_ACCELERATE_CLIPS = {"FSDP": "FSDP v1 .* FullyShardedDataParallel.clip_grad_norm_",
                        "XLA": "XLA", "MEGATRON_LM": "Megatron-LM .* clips in its optimizer"}


def test_norm_type_zero_goes_to_accelerate(counter):
    gradclip_hf.patch()
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    model(torch.randn(2, 4)).sum().backward()
    with pytest.warns(FrameworkClipsWarning, match="norm_type=0 counts the gradients"):
        count = accelerator.clip_grad_norm_(model.parameters(), float("inf"), norm_type=0)
    assert count.item() == 2  # two gradients with a nonzero norm: Accelerate's meaning
    assert counter.calls["gradclip norm"] == 0


def test_negative_max_grad_norm_raises_instead_of_flipping_gradients():
    gradclip_hf.patch()
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    model(torch.randn(2, 4)).sum().backward()
    before = model.weight.grad.clone()
    with pytest.raises(ValueError, match="max_norm"):
        accelerator.clip_grad_norm_(model.parameters(), -1.0)
    assert torch.equal(model.weight.grad, before)


@pytest.mark.parametrize("distribution,version", [("accelerate", "0.34.2"), ("accelerate", "2.0.0"),
                                                  ("transformers", "4.40.0")])
def test_unsupported_versions_are_refused_at_patch_time(distribution, version, monkeypatch):
    real_version = _common.metadata.version
    monkeypatch.setattr(_common.metadata, "version",
                        lambda name: version if name == distribution else real_version(name))
    with pytest.raises(RuntimeError, match=f"supports {distribution} >= .*{version} is installed"):
        gradclip_hf.patch()
    assert not gradclip_hf.is_patched()
    assert Accelerator.__dict__["clip_grad_norm_"] is ORIGINAL_CLIP_GRAD_NORM


def test_a_changed_accelerator_signature_is_refused(monkeypatch):
    def clip_grad_norm_(self, parameters, max_norm, norm_type=2, foreach=None):
        raise AssertionError("not called")

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip_grad_norm_)
    with pytest.raises(RuntimeError, match="not supported"):
        gradclip_hf.patch()
    assert not gradclip_hf.is_patched()


def test_missing_accelerate_names_the_extra(monkeypatch):
    def not_installed(name):
        raise _common.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_common.metadata, "version", not_installed)
    with pytest.raises(ImportError, match=r"gradclip\[hf\]"):
        gradclip_hf.patch()


DOCS = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
HF_EXAMPLES = [block for block in re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
               if "gradclip.integrations.huggingface" in block]


def test_the_docs_show_the_trainer_and_an_accelerate_loop():
    assert any("transformers.Trainer" in code for code in HF_EXAMPLES)
    assert any("accelerator.clip_grad_norm_" in code for code in HF_EXAMPLES)


@pytest.mark.parametrize("code", HF_EXAMPLES, ids=[f"example-{i}" for i in range(len(HF_EXAMPLES))])
def test_documented_example_runs(code, counter):
    exec(compile(code, str(DOCS), "exec"), {"__name__": "__example__"})
    assert counter.calls["gradclip norm"] >= 4
    assert not gradclip_hf.is_patched(), "the example undoes its patch"


@contextlib.contextmanager
def one_process_group(tmp_path):
    """A gloo group of one process, for DTensor gradients on a mesh of one CPU."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield torch.distributed.device_mesh.init_device_mesh("cpu", (1,))
    finally:
        torch.distributed.destroy_process_group()


def test_dtensor_gradients_clip_with_gradclip(tmp_path, counter):
    """DTensor gradients (a model fully_shard-ed by hand, tensor parallelism) reach
    gradclip's distributed clip; the norm comes back as a plain tensor, as Accelerate's."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    accelerator = Accelerator(cpu=True)
    with one_process_group(tmp_path) as mesh:
        def params():
            weight = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
            weight.grad = distribute_tensor(torch.full((4, 4), 2.0), mesh, [Shard(0)])
            bias = torch.nn.Parameter(distribute_tensor(torch.randn(4), mesh, [Replicate()]))
            bias.grad = distribute_tensor(torch.full((4,), 2.0), mesh, [Replicate()])
            return [weight, bias]

        theirs = params()
        expected = accelerator.clip_grad_norm_(theirs, 1.0)
        gradclip_hf.patch()
        ours = params()
        norm = accelerator.clip_grad_norm_(ours, 1.0)
        assert counter.calls["gradclip norm"] == 1 and torch_norm_calls(counter) == 1
        assert type(norm) is torch.Tensor and type(expected) is torch.Tensor
        assert norm.item() == pytest.approx(math.sqrt(20 * 4.0)) == expected.item()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.grad.full_tensor(), b.grad.full_tensor())
        accelerator.clip_grad_value_(ours, 0.1)
        assert counter.calls["gradclip value"] == 1
        assert all(p.grad.full_tensor().abs().max() <= 0.1 for p in ours)


def test_fsdp2_plugin_clips_with_gradclip(tmp_path, monkeypatch, counter):
    """Accelerate's FSDP plugin needs GPUs (on the CPU it stays MULTI_CPU and wraps the model
    in DDP): here the Accelerator is told it runs FSDP2, as it does on GPUs, and is given
    fully_shard-ed DTensor gradients. gradclip clips them, with the norm Accelerate's own
    FSDP2 path (_clip_grad_norm_dtensor_aware) returns. (FSDP v1: see
    test_layouts_gradclip_does_not_clip_go_to_accelerate.)"""
    from torch.distributed.fsdp import fully_shard

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    monkeypatch.setattr(Accelerator, "is_fsdp2", property(lambda self: True))
    with one_process_group(tmp_path) as mesh:
        def model_with_grads(accelerator):
            torch.manual_seed(0)
            model = fully_shard(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)),
                                mesh=mesh)
            model(torch.randn(4, 8)).square().sum().backward()
            accelerator._models.append(model)
            return model

        accelerator = Accelerator(cpu=True)
        theirs = model_with_grads(accelerator)
        expected = accelerator.clip_grad_norm_(theirs.parameters(), 0.1)
        assert counter.calls["gradclip norm"] == 0 and torch_norm_calls(counter) >= 1
        gradclip_hf.patch()
        ours = model_with_grads(accelerator)
        norm = accelerator.clip_grad_norm_(ours.parameters(), 0.1)
        assert counter.calls["gradclip norm"] == 1
        assert type(norm) is torch.Tensor and expected.item() > 0.1
        assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a.grad.full_tensor(), b.grad.full_tensor())


def test_infinite_max_norm_only_measures(counter):
    """The Trainer asks for grad_norm this way when clipping is off (transformers 5)."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    model(torch.randn(8, 16)).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    expected = accelerator.clip_grad_norm_(model.parameters(), float("inf"))

    gradclip_hf.patch()
    norm = accelerator.clip_grad_norm_(model.parameters(), float("inf"))
    assert counter.calls["gradclip norm"] == 1
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_first_clip_logs_one_info_line(caplog, counter):
    gradclip_hf.patch(backend="reference")
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    with caplog.at_level(logging.INFO, logger="gradclip"):
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            accelerator.clip_grad_value_(model.parameters(), 1.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "gradclip"]
    assert len(lines) == 1, lines
    assert all(word in lines[0] for word in ("gradclip clips", "huggingface", "backend reference", "clip_grad_norm_"))
    assert caplog.records[0].levelno == logging.INFO


@pytest.mark.parametrize("backend,error", [("bogus", ValueError), ("cuda", gradclip.BackendUnavailableError)],
                         ids=["bogus", "cuda_without_a_gpu"])
def test_a_backend_that_cannot_run_is_refused_at_patch_time(backend, error):
    if backend == "cuda" and torch.cuda.is_available():
        pytest.skip("the cuda backend can run here")
    with pytest.raises(error, match=f"backend={backend!r}"):
        gradclip_hf.patch(backend=backend)
    assert not gradclip_hf.is_patched()
    gradclip_hf.patch()
    with pytest.raises(error):
        gradclip_hf.patch(backend=backend)
    assert gradclip_hf._active.backend == "auto", "a refused backend changes nothing"


def test_unpatch_restores_the_trainers_mixed_mesh_norm():
    original = transformers.Trainer.__dict__.get("_mixed_mesh_grad_norm")
    if original is None:
        pytest.skip("this transformers clips every layout through the Accelerator")
    gradclip_hf.patch()
    assert transformers.Trainer._mixed_mesh_grad_norm is gradclip_hf._mixed_mesh_grad_norm
    gradclip_hf.unpatch()
    assert transformers.Trainer.__dict__["_mixed_mesh_grad_norm"] is original


@pytest.mark.parametrize("max_grad_norm", [-1.0, math.nan], ids=["negative", "nan"])
def test_trainer_turns_clipping_off_for_a_negative_or_nan_max_grad_norm(max_grad_norm, tmp_path, counter):
    """The Trainer clips only when max_grad_norm > 0: a negative or NaN value turns
    clipping off (no ValueError), and the logged grad_norm is measured through gradclip."""
    def run():
        model = tiny_model("gpt2")
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, max_steps=2, per_device_train_batch_size=8,
            learning_rate=1e-2, max_grad_norm=max_grad_norm, logging_steps=1, report_to=[],
            save_strategy="no", seed=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=token_dataset(16))
        trainer.train()
        norms = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
        return norms, [p.detach().clone() for p in model.parameters()]

    expected_norms, expected = run()
    gradclip_hf.patch()
    norms, weights = run()
    assert counter.calls["gradclip norm"] == 2
    assert all(n is not None and math.isfinite(n) for n in norms)
    assert norms == pytest.approx(expected_norms, rel=1e-6)
    for a, b in zip(weights, expected):
        torch.testing.assert_close(a, b)


def test_the_docs_say_what_the_trainer_does_with_a_negative_max_grad_norm():
    text = " ".join(DOCS.read_text().split())
    assert "a negative or NaN `max_grad_norm` raises" not in text
    assert "`max_grad_norm <= 0` or NaN turns the Trainer's clipping off" in text
