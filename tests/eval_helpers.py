"""Helpers shared by the FID / FVD / CLIP and experiments tests: loading the eval/ and experiments/ scripts, a fake
generator module.

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


def load_script(folder: str, name: str) -> ModuleType:
    """Import <folder>/<name>.py by path (eval/ and experiments/ are folders of scripts, not packages)."""
    spec = importlib.util.spec_from_file_location(f"_test_{folder}_{name}", os.path.join(ROOT, folder, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_eval_script(name: str) -> ModuleType:
    """A user entry point: eval/<name>.py."""
    return load_script("eval", name)


def load_experiment(name: str) -> ModuleType:
    """A demo-tuning diagnostic: experiments/<name>.py."""
    return load_script("experiments", name)


def load_benchmark_with_generator(name: str, generator: object, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """eval/<name>.py with `apt.inference.load_generator` replaced by one returning `generator`."""
    fake = types.ModuleType("apt.inference")
    fake.load_generator = lambda checkpoint, device="cpu": generator
    monkeypatch.setitem(sys.modules, "apt.inference", fake)
    return load_eval_script(name)
