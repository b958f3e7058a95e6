"""The test suite's own conventions: GPU tests are selectable, random seeds replayable."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def collect(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", *args, str(TESTS)],
                         capture_output=True, text=True, cwd=TESTS.parent).stdout
    return [line for line in out.splitlines() if "::" in line]


def test_every_cuda_case_carries_the_gpu_marker():
    """`pytest -m gpu` must select every test that needs a GPU, in every file."""
    cpu_only = collect("-m", "not gpu")
    on_cuda = [node for node in cpu_only if re.search(r"[\[-]cuda[\]-]", node)]
    assert not on_cuda, f"CUDA cases without the gpu marker: {on_cuda[:10]}"
    gpu_files = {node.split("::")[0] for node in collect("-m", "gpu")}
    for name in ("test_functional.py", "test_optimizer.py", "test_amp.py", "test_triton_backend.py"):
        assert any(f.endswith(name) for f in gpu_files), f"no gpu-marked test in {name}"


def test_the_seed_can_be_pinned(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         str(TESTS / "test_functional.py"), "-k", "mixed_dtypes_in_one_call and reference"],
        capture_output=True, text=True, cwd=TESTS.parent, env={**__import__("os").environ,
                                                               "GRADCLIP_TEST_SEED": "4242"})
    assert "random seed: 4242" in out.stdout, out.stdout[-2000:]
