"""``python -m gradclip COMMAND``: demo, bench, build, backends."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each command lives in its own module, imported only when run: (module, summary).
COMMANDS = {
    "demo": ("gradclip.demo", "train a small model with and without clipping, plot the run"),
    "bench": ("gradclip.bench.cli", "time the clip paths of each backend against torch"),
    "build": ("gradclip.backends.cuda_build", "compile (or reuse) the CUDA extension, list its ops"),
    "backends": ("gradclip.__main__", "say which backends can run here, and why not"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``backends`` command takes no arguments."""


def run(args: argparse.Namespace) -> int:
    from . import available_backends

    for name, status in available_backends().items():
        print(f"{name:7s} {status}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradclip", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, summary) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.set_defaults(module_name=module_name)
        if name in (sys.argv[1:2] if argv is None else argv[:1]):
            importlib.import_module(module_name).add_arguments(sub)
    args = parser.parse_args(argv)
    return importlib.import_module(args.module_name).run(args)


if __name__ == "__main__":
    sys.exit(main())
