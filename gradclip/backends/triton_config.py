"""The Triton backend's launch parameters, and whether its kernels run in the interpreter."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

CONFIG_ENV = "GRADCLIP_TRITON_CONFIG"


@dataclass(frozen=True)
class TritonConfig:
    """Launch parameters. Block sizes are powers of two; chunks a power of two in between.

    ``programs`` fixes the grid (the interpreter); otherwise a grid is
    ``programs_per_sm * SMs``, capped at the number of chunks. Chunks are sized to give
    each norm program about ``chunks_per_program`` of them (balance against per-chunk
    overhead), within ``[max(block, scale_block), max_chunk]`` elements.
    ``GRADCLIP_TRITON_CONFIG="block=8192,num_warps=8"`` overrides fields of the default.
    """

    block: int = 4096
    num_warps: int = 8
    programs_per_sm: int = 4
    scale_block: int = 4096
    scale_num_warps: int = 8
    scale_programs_per_sm: int = 4
    chunks_per_program: int = 16
    max_chunk: int = 1 << 16
    programs: int = 0

    def __post_init__(self):
        for name in ("block", "scale_block", "max_chunk"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"TritonConfig.{name} must be a power of two >= 16, got {value}")


INTERPRETER_CONFIG = TritonConfig(block=32, num_warps=1, scale_block=32, scale_num_warps=1,
                                  chunks_per_program=2, max_chunk=64, programs=3)


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (CPU tensors, slow)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def config_from_env(base: TritonConfig) -> TritonConfig:
    """``base`` with the fields ``$GRADCLIP_TRITON_CONFIG`` sets (``NAME=INTEGER,...``)."""
    text = os.environ.get(CONFIG_ENV, "").strip()
    if not text:
        return base
    fields = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in TritonConfig.__dataclass_fields__ or not value.strip().isdigit():
            raise ValueError(f"{CONFIG_ENV}={text!r}: {item!r} is not NAME=INTEGER with NAME one of "
                             + ", ".join(TritonConfig.__dataclass_fields__))
        fields[name] = int(value)
    return replace(base, **fields)


def default_config(device_type: str) -> TritonConfig:
    """The interpreter's small blocks on the CPU; the GPU default (and the environment's
    overrides) elsewhere."""
    return INTERPRETER_CONFIG if device_type == "cpu" else config_from_env(TritonConfig())
