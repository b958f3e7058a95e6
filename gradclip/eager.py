"""``run_eagerly``: ``torch.compiler.disable``, without importing Dynamo at import time.

Applying ``torch.compiler.disable`` imports ``torch._dynamo`` (about a second); as a
decorator it would make ``import gradclip`` pay that for every user. Nothing can be
compiling before Dynamo is imported, so the decorated function runs directly until then,
and goes through ``torch.compiler.disable`` from the first call after.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def run_eagerly(fn: F) -> F:
    """Decorate ``fn`` so that ``torch.compile`` runs it eagerly (a graph break)."""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)  # nothing is being compiled
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call
