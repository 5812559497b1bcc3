"""The product path does not import the toy demo (``apt.toy``) unless a recipe asks for it.

Checked in a fresh interpreter with a clean environment: any earlier test may already have imported
``apt.toy`` into this one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess  # each test starts a fresh interpreter (imports take seconds)
REPO = Path(__file__).resolve().parent.parent
PRODUCT_MODULES = ["apt.train", "apt.inference", "apt.sample", "apt.export", "apt.text", "apt.data", "apt.prompts", "apt.methods"]


def toy_modules_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the ``apt.toy`` modules it left in ``sys.modules``."""
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted(m for m in sys.modules if m == 'apt.toy' or m.startswith('apt.toy.'))))\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PL_"))}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_product_modules_and_a_diffusers_recipe_do_not_import_the_toy():
    # apt.methods (the plain-torch training steps) is checked once it exists.
    present = [m for m in PRODUCT_MODULES if importlib.util.find_spec(m) is not None]
    assert "apt.train" in present and "apt.inference" in present
    code = "\n".join(f"import {m}" for m in present) + (
        "\nfrom apt.config import load_config\nfrom apt.prompts import sample_prompts\n"
        "c = load_config('recipes/video/wan-1280x720-24fps.yaml')\nassert sample_prompts(c), 'the recipe names sample prompts'")
    assert toy_modules_after(code) == []


def test_the_toy_text_encoder_reads_the_toy_vocabulary():
    """The one product-path use that a recipe asks for (``text.encoder: toy-t5``): only the world, not the rest."""
    assert toy_modules_after("from apt.text import toy_vocabulary\ntoy_vocabulary()") == ["apt.toy", "apt.toy.world"]
