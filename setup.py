"""Build script. A plain ``pip install -e .`` compiles nothing: the CUDA extension is
built on first use (JIT, cached) or ahead of time with ``GRADCLIP_BUILD_CUDA=1``."""
from setuptools import setup

setup()
