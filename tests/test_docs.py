"""What users copy must run, and print what the docs say it prints.

Every ```python block of the README and of the guides in docs/ runs here, in a fresh
namespace, as a user would paste it; a print marked "# -> <text>" must print that text
(conftest.run_example). The integration guide's blocks run in the integration tests (they
need the frameworks set up), and the ```py blocks, which need several ranks, in
test_distributed.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import python_blocks, run_example

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + [ROOT / "docs" / name for name in
                               ("functional.md", "optimizer.md", "backends.md", "design.md",
                                "performance.md", "bench.md", "distributed.md")]
EXAMPLES = [(f"{doc.name}-{i}", code) for doc in DOCS for i, code in enumerate(python_blocks(doc))]


@pytest.mark.parametrize("code", [code for _, code in EXAMPLES], ids=[name for name, _ in EXAMPLES])
def test_documented_example_runs_and_prints_what_it_says(code):
    run_example(code)


def test_the_readme_shows_the_three_uses_with_checked_output():
    readme = python_blocks(ROOT / "README.md")
    assert len(readme) == 3, "drop-in, ClippedOptimizer with AMP, the trainer integrations"
    assert "clip_grad_norm_" in readme[0] and "GradScaler" in readme[1]
    assert all(name in readme[2] for name in ("patch()", "FusedGradientClipping",
                                              "FabricGradientClipping"))
    assert all("# ->" in code for code in readme[:2])


def test_the_wrapper_is_documented_with_runnable_examples():
    wrapper = [code for _, code in EXAMPLES if "ClippedOptimizer" in code]
    assert len(wrapper) >= 3, "the docs must show the wrapper with and without AMP"
    assert any("GradScaler" in code for code in wrapper)


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def test_every_local_link_of_the_docs_resolves():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            assert file.exists(), f"{doc.name}: link to {target}: no such file"
            if anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
                assert anchor in {_slug(h) for h in headings}, f"{doc.name}: no heading #{anchor} in {path or doc.name}"


def test_the_readme_is_short_and_its_figures_are_dated():
    readme = (ROOT / "README.md").read_text()
    assert 150 <= len(readme.splitlines()) <= 250
    results = readme[readme.index("## Results"):readme.index("## What runs where")]
    for fact in ("H100", "torch 2.11.0", "2026-11-23", "6acfcf9", "predate"):
        assert fact in results, f"the results table does not say {fact!r}"
