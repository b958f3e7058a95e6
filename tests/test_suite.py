"""The test suite's own conventions: GPU tests are selectable, random seeds replayable."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

# The suite's own conventions, not gradclip's behaviour.
pytestmark = pytest.mark.newest_torch

TESTS = Path(__file__).resolve().parent


def collected(request) -> list[tuple[str, bool]]:
    """(node id, carries the gpu marker) of every test in tests/: this session's own items
    when it collected every file (an unfiltered run of the whole suite, each xdist worker's too), else one
    ``--collect-only`` run in a subprocess."""
    items = request.session.items
    files = {Path(str(item.path)).name for item in items}
    unfiltered = not any(request.config.getoption(o) for o in ("markexpr", "keyword", "deselect"))
    if unfiltered and files >= {p.name for p in TESTS.glob("test_*.py")}:
        return [(item.nodeid, item.get_closest_marker("gpu") is not None) for item in items]
    gpu = set(_collect_only("-m", "gpu"))
    return [(node, node in gpu) for node in _collect_only()]


def _collect_only(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", *args, str(TESTS)],
                         capture_output=True, text=True, cwd=TESTS.parent).stdout
    return [line for line in out.splitlines() if "::" in line]


def test_every_cuda_case_carries_the_gpu_marker(request):
    """`pytest -m gpu` must select every test that needs a GPU, in every file."""
    nodes = collected(request)
    on_cuda = [node for node, gpu in nodes if not gpu and re.search(r"[\[-]cuda[\]-]", node)]
    assert not on_cuda, f"CUDA cases without the gpu marker: {on_cuda[:10]}"
    gpu_files = {node.split("::")[0] for node, gpu in nodes if gpu}
    for name in ("test_functional.py", "test_optimizer.py", "test_amp.py", "test_triton_backend.py"):
        assert any(f.endswith(name) for f in gpu_files), f"no gpu-marked test in {name}"


def test_the_seed_can_be_pinned(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         str(TESTS / "test_functional.py"), "-k", "mixed_dtypes_in_one_call and reference"],
        capture_output=True, text=True, cwd=TESTS.parent, env={**__import__("os").environ,
                                                               "GRADCLIP_TEST_SEED": "4242"})
    assert "random seed: 4242" in out.stdout, out.stdout[-2000:]
