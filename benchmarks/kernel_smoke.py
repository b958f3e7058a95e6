"""Every fused op once, on small lists, against the reference backend on the same GPU.

Small enough to run under compute-sanitizer (memcheck, racecheck, synccheck): mixed dtypes,
empty, one-element, odd and chunk-edge sizes, a misaligned view, a non-contiguous
gradient, a gradient listed twice; the per-tensor and AGC ops first (they have never run
on a GPU). Exits 1 on a mismatch. Run from the repository root:

    python benchmarks/kernel_smoke.py [cuda] [triton]
"""

from __future__ import annotations

import math
import sys

import torch

from gradclip.backends import dispatch

SIZES = [0, 1, 7, 4095, 4096, 4097, 16383, 16385, 65537]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def tensors(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for i, n in enumerate(SIZES):
        t = torch.randn(n + 1, generator=gen, device="cuda", dtype=torch.float32)
        out.append(t[1:].to(DTYPES[i % len(DTYPES)]))  # offset by one element: misaligned
    out.append(torch.randn(5, 7, generator=gen, device="cuda").t())  # not contiguous
    out.append(torch.randn(64, 33, generator=gen, device="cuda"))
    return out


def close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 2e-3) -> bool:
    ok = torch.allclose(a.double().cpu(), b.double().cpu(), rtol=rtol, atol=1e-6, equal_nan=True)
    if not ok:
        print(f"MISMATCH {what}: {a.cpu()} vs {b.cpu()}")
    return ok


def run(backend: str) -> bool:
    ok = True
    for norm_type in (2.0, 1.0, math.inf):
        ours, theirs = tensors(0), tensors(0)
        ok &= close(*(dispatch.tensor_norms(t, norm_type, backend=b) for t, b in
                      ((ours, backend), (theirs, "reference"))), f"{backend} tensor_norms p={norm_type}")
        ok &= close(dispatch.clip_per_tensor_(ours, norm_type, 0.5, backend=backend),
                    dispatch.clip_per_tensor_(theirs, norm_type, 0.5, backend="reference"),
                    f"{backend} clip_per_tensor_ p={norm_type}")
        ok &= all(close(a, b, f"{backend} per-tensor clipped grads") for a, b in zip(ours, theirs))
        weights = tensors(1)
        ours, theirs = tensors(2), tensors(2)
        shared = ours + [ours[-1]]  # a gradient listed twice: clipped once
        ok &= close(dispatch.agc_(weights + [weights[-1]], shared, 0.01, 1e-3, norm_type, backend),
                    dispatch.agc_(weights + [weights[-1]], theirs + [theirs[-1]], 0.01, 1e-3,
                                  norm_type, "reference"), f"{backend} agc_ p={norm_type}")
        ok &= all(close(a, b, f"{backend} AGC clipped grads") for a, b in zip(ours, theirs))
        coefs = torch.linspace(0.5, 1.0, len(ours), device="cuda")
        dispatch.scale_per_tensor_(ours, coefs, backend)
        dispatch.scale_per_tensor_(theirs, coefs, "reference")
        ok &= all(close(a, b, f"{backend} scale_per_tensor_") for a, b in zip(ours, theirs))
        ours, theirs = tensors(3), tensors(3)
        inv = torch.tensor([2.0 ** -8], device="cuda")
        ok &= close(dispatch.clip_grads_(ours, norm_type, 1.0, inv, backend),
                    dispatch.clip_grads_(theirs, norm_type, 1.0, inv, "reference"),
                    f"{backend} clip_grads_ AMP p={norm_type}")
        ok &= all(close(a, b, f"{backend} clipped grads") for a, b in zip(ours, theirs))
        dispatch.clamp_(ours, 0.1, backend)
        dispatch.clamp_(theirs, 0.1, "reference")
        ok &= all(close(a, b, f"{backend} clamp_") for a, b in zip(ours, theirs))
    torch.cuda.synchronize()
    print(f"{backend}: {'ok' if ok else 'FAILED'}")
    return ok


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("kernel_smoke.py needs a CUDA device")
    results = [run(name) for name in (sys.argv[1:] or ["cuda", "triton"])]
    sys.exit(0 if all(results) else 1)
