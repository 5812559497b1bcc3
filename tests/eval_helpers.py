"""Helpers shared by the FID / FVD / CLIP tests: loading the eval/ scripts, a fake generator module.

The detector stand-ins live in `apt.eval.standins` (eval/measure_fvd_memory.py uses them too).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from types import ModuleType

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_eval_script(name: str) -> ModuleType:
    """Import eval/<name>.py by path (eval/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_test_{name}", os.path.join(ROOT, "eval", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_benchmark_with_generator(name: str, generator: object, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """eval/<name>.py with `apt.inference.load_generator` replaced by one returning `generator`."""
    fake = types.ModuleType("apt.inference")
    fake.load_generator = lambda checkpoint, device="cpu": generator
    monkeypatch.setitem(sys.modules, "apt.inference", fake)
    return load_eval_script(name)
