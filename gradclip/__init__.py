"""gradclip: fused, sync-free gradient clipping for PyTorch.

Drop-in functions (``clip_grad_norm_``, ``get_total_norm``, ``clip_grads_with_norm_``,
``clip_grad_value_``) with torch's signatures, and ``ClippedOptimizer``, which wraps any
``torch.optim`` optimizer and fuses the AMP unscale into the clip; clip rules (``ZClip``,
``AutoClip``, ``PerTensor``, ``AGC``), the ``SpikeGuard`` and ``log_metrics``. Backends:
``cuda`` (the C++/CUDA extension), ``triton`` and ``reference`` (pure torch, the oracle;
``torch`` is accepted as its old name); see :func:`available_backends`.
"""

from .backends import BackendStatus, BackendUnavailableError, available_backends
from .functional import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm
from .optimizer import ClippedOptimizer
from .rules import AutoClip, SpikeGuard, ZClip, suggest_max_norm
from .health import log_metrics
from .per_tensor import AGC, PerTensor, adaptive_clip_grad_, clip_grad_norm_per_tensor_, tensor_norms
from .amp import GradScaler

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "AutoClip",
    "BackendStatus",
    "BackendUnavailableError",
    "ClippedOptimizer",
    "GradScaler",
    "PerTensor",
    "SpikeGuard",
    "ZClip",
    "adaptive_clip_grad_",
    "available_backends",
    "clip_grad_norm_",
    "clip_grad_norm_per_tensor_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "log_metrics",
    "suggest_max_norm",
    "tensor_norms",
]
