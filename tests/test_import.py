"""Importing gradclip stays cheap: it imports neither Dynamo nor torch.distributed.tensor."""

from __future__ import annotations

import subprocess
import sys


def test_import_does_not_load_dynamo_or_dtensor():
    code = ("import sys, torch; import gradclip; "
            "print(sorted(m for m in ('torch._dynamo', 'torch.distributed.tensor') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", "importing gradclip loaded " + out.stdout
