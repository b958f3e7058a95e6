"""The gradient lists the benchmark times and checks: defined once, used by every part of it.

A workload is a list of parameter shapes. The four of ``docs/performance.md``:

- ``llama-1b``: a llama-1B-like decoder (hidden 2048, 16 layers, full multi-head attention,
  MLP 5632, vocabulary 32000, untied head): 147 tensors, 953M parameters.
- ``gpt2``: GPT-2 small (124M, tied head, 1024 positions): 148 tensors.
- ``resnet50``: torchvision's ResNet-50: 161 tensors, 25.6M parameters.
- ``2000x4096``: 2000 tensors of 4096 elements (many small tensors: host overhead).

and ``odd-sizes``, for ``--check`` and sanitizer runs rather than timing: sizes around the
kernels' chunk and launch limits, empty tensors first and last, and thousands of small
tensors (several launches' worth).

Others come from ``--shapes FILE`` (JSON) or ``--model NAME`` (a torchvision model, one of the
above, or ``package.module:factory``).
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Workload:
    """A named list of gradient shapes."""

    key: str
    title: str
    shapes: tuple[Shape, ...]

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def nbytes(self, dtype: torch.dtype) -> int:
        return self.numel * torch.empty((), dtype=dtype).element_size()

    def describe(self) -> str:
        return f"{self.title} ({self.n_tensors} tensors, {_millions(self.numel)} params)"


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e8 else f"{n / 1e6:.0f}M"


def llama_1b_like_shapes(hidden: int = 2048, layers: int = 16, mlp: int = 5632,
                         vocab: int = 32000) -> list[Shape]:
    """Embedding, per layer 4 attention projections, 3 MLP matrices and 2 RMSNorm weights,
    final norm, untied output head."""
    shapes: list[Shape] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4
        shapes += [(mlp, hidden), (mlp, hidden), (hidden, mlp)]
        shapes += [(hidden,), (hidden,)]
    return shapes + [(hidden,), (vocab, hidden)]


def gpt2_shapes(hidden: int = 768, layers: int = 12, vocab: int = 50257,
                positions: int = 1024) -> list[Shape]:
    """Token and position embeddings, per layer 2 LayerNorms and 4 Conv1D-style linears
    (weight stored input-major, as GPT-2 does), final LayerNorm; the head is tied."""
    shapes: list[Shape] = [(vocab, hidden), (positions, hidden)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden,), (hidden, 3 * hidden), (3 * hidden,),
                   (hidden, hidden), (hidden,), (hidden,), (hidden,),
                   (hidden, 4 * hidden), (4 * hidden,), (4 * hidden, hidden), (hidden,)]
    return shapes + [(hidden,), (hidden,)]


def resnet50_shapes(classes: int = 1000) -> list[Shape]:
    """ResNet-50 in torchvision's parameter order: stem, 16 bottlenecks (1x1, 3x3, 1x1
    convolutions, each followed by a batch norm's weight and bias; a 1x1 projection on the
    first block of each stage), fully connected head."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out_ch = 4 * width
        for block in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (out_ch, width, 1, 1), (out_ch,), (out_ch,)]
            if block == 0:
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    return shapes + [(classes, in_ch), (classes,)]


def mlp_shapes(widths=(784, 256, 128, 10)) -> list[Shape]:
    """A small MLP (an MNIST classifier): weight and bias of each of 3 linears, 6 tensors."""
    shapes: list[Shape] = []
    for fan_in, fan_out in zip(widths, widths[1:]):
        shapes += [(fan_out, fan_in), (fan_out,)]
    return shapes


def tiny_gpt_shapes(hidden: int = 128, layers: int = 2, vocab: int = 1000,
                    positions: int = 64) -> list[Shape]:
    """A two-layer GPT-2-shaped model (embeddings, 12 tensors per layer, final LayerNorm):
    28 tensors, the kind of list a small fine-tune clips."""
    return gpt2_shapes(hidden, layers, vocab, positions)


WORKLOADS: dict[str, Workload] = {
    w.key: w for w in (
        Workload("llama-1b", "llama-1B-like", tuple(llama_1b_like_shapes())),
        Workload("gpt2", "GPT-2 124M", tuple(gpt2_shapes())),
        Workload("resnet50", "ResNet-50", tuple(resnet50_shapes())),
        Workload("2000x4096", "2000 x 4096", ((4096,),) * 2000),
    )
}


def odd_sizes_shapes(small_tensors: int = 3000) -> list[Shape]:
    """Empty first and last; 1 and 7 elements; either side of 16384 and 65536 (chunk
    sizes); a million and 3; then ``small_tensors`` tensors of 0 to 2999 elements."""
    sizes = [0, 1, 7, 16383, 16384, 16385, 65537, 1_000_003]
    sizes += [(i * 7919) % 3000 for i in range(small_tensors)]
    return [(n,) for n in sizes + [0]]


ODD_SIZES = Workload("odd-sizes", "odd sizes", tuple(odd_sizes_shapes()))
# Small lists, where a call is all host overhead (the CPU section times them).
SMALL = {w.key: w for w in (Workload("mlp-6", "MLP", tuple(mlp_shapes())),
                            Workload("tiny-gpt-28", "tiny GPT", tuple(tiny_gpt_shapes())))}
# Every --workloads key: the four timed by default, the edge cases, the small lists.
ALL_WORKLOADS: dict[str, Workload] = {**WORKLOADS, ODD_SIZES.key: ODD_SIZES, **SMALL}

# --model names served without torchvision: the built-in lists above.
_LOCAL_MODELS = {"resnet50": "resnet50", "gpt2": "gpt2", "llama-1b": "llama-1b"}


def get_workload(key: str) -> Workload:
    try:
        return ALL_WORKLOADS[key]
    except KeyError:
        raise ValueError(f"unknown workload {key!r}; choose from {', '.join(ALL_WORKLOADS)}, "
                         "or pass --shapes FILE / --model NAME") from None


def _as_shape(value, where: str) -> Shape:
    if isinstance(value, int):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(d, int) and d >= 0 for d in value):
        raise ValueError(f"{where}: a shape must be a list of non-negative integers, got {value!r}")
    return tuple(value)


def load_shapes_file(path: str | Path) -> Workload:
    """A workload from JSON: either a list of shapes (``[[4096, 4096], [4096], 10]``) or
    ``{"name": "my model", "shapes": [...]}``. An integer stands for a 1-d shape."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--shapes {path}: cannot read a JSON list of shapes: {error}") from None
    name = path.stem
    if isinstance(data, dict):
        name = str(data.get("name", name))
        data = data.get("shapes")
    if not isinstance(data, list) or not data:
        raise ValueError(f"--shapes {path}: expected a non-empty list of shapes or "
                         '{"name": ..., "shapes": [...]}')
    shapes = tuple(_as_shape(s, f"--shapes {path}, entry {i}") for i, s in enumerate(data))
    return Workload(f"file:{path.name}", name, shapes)


def _module_shapes(module: torch.nn.Module) -> tuple[Shape, ...]:
    return tuple(tuple(p.shape) for p in module.parameters())


def model_workload(name: str) -> Workload:
    """Parameter shapes of a model, built on the meta device (no memory, no weights).

    ``name`` is a torchvision model name (when torchvision is importable), one of the
    built-in lists (``resnet50``, ``gpt2``, ``llama-1b``), or ``package.module:factory``,
    a callable returning an ``nn.Module``.
    """
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"--model {name!r}: cannot find {attr!r} in {module_name!r}: {error}") from None
        with torch.device("meta"):
            model = factory()
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"--model {name!r}: the factory returned a {type(model).__name__}, "
                             "not a torch.nn.Module")
        return Workload(f"model:{name}", name, _module_shapes(model))
    try:
        import torchvision
    except ImportError:
        torchvision = None
    if torchvision is not None and name in torchvision.models.list_models():
        with torch.device("meta"):
            model = torchvision.models.get_model(name, weights=None)
        return Workload(f"model:{name}", f"{name} (torchvision)", _module_shapes(model))
    if name in _LOCAL_MODELS:
        local = WORKLOADS[_LOCAL_MODELS[name]]
        return Workload(f"model:{name}", f"{local.title} (built-in shapes)", local.shapes)
    hint = "" if torchvision is not None else " (torchvision is not installed)"
    raise ValueError(f"--model {name!r}: not a torchvision model{hint} nor one of "
                     f"{', '.join(_LOCAL_MODELS)}; or pass package.module:factory")


def make_grads(workload: Workload, dtype: torch.dtype, device: torch.device | str,
               *, align: int = 512) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Uninitialised gradients of the workload's shapes, as views into one flat buffer.

    Returns the buffer and the views. Each view starts on an ``align``-byte boundary, as the
    caching allocator would place separate tensors; one ``copy_`` of the buffer restores
    them all. Fill them with :func:`fill_grads_`.
    """
    item = torch.empty((), dtype=dtype).element_size()
    step = max(1, align // item)
    offsets, total = [], 0
    for shape in workload.shapes:
        offsets.append(total)
        total += -(-math.prod(shape) // step) * step
    flat = torch.empty(max(total, 1), dtype=dtype, device=device)
    return flat, [flat[o:o + math.prod(s)].view(s) for o, s in zip(offsets, workload.shapes)]


def fill_grads_(flat: torch.Tensor, views: list[torch.Tensor], norm: float, seed: int = 0) -> None:
    """Fill ``flat`` with normal values (never zeros: they can time differently), scaled so
    that the global 2-norm of ``views`` is ``norm``."""
    generator = torch.Generator(device=flat.device).manual_seed(seed)
    flat.normal_(generator=generator)
    current = torch.linalg.vector_norm(torch.stack(
        torch._foreach_norm(views, 2.0, dtype=torch.float32)))
    flat.mul_((norm / current).to(flat.dtype))
