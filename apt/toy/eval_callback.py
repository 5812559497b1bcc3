"""In-training evaluation: every ``eval.every_steps`` stage steps, sample the EMA network on a fixed
validation prompt set and log the toy metrics (Fréchet distance, attribute accuracy) with media.

The prompts and noise seeds are disjoint from the demo report's evaluation set, so choosing a
checkpoint by this number does not peek at the reported one (docs/design.md §5).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from apt.config import MANY_STEP_STAGES, Config
from apt.media import save_samples
from apt.toy.metrics import VAL_NOISE_SEED, VAL_PROMPT_SEED


class ToyEvalCallback(L.Callback):
    def __init__(self, config: Config):
        from apt.toy.world import eval_prompts

        self.config = config
        self.every = config.eval.every_steps
        self.frames = config.data.frames
        self.prompts = eval_prompts(config.eval.num_samples, seed=VAL_PROMPT_SEED, frames=self.frames)
        self.dir = Path(config.run_dir) / "eval"
        self._classifier = self._real = None
        self._last = -1

    def _setup(self) -> None:
        from apt.toy.classifier import load_toy_classifier
        from apt.toy.metrics import real_stats

        if self._classifier is None:
            self._classifier = load_toy_classifier(self.config.eval.classifier)
            self._real = real_stats(self._classifier, frames=self.frames, n=self.config.eval.num_samples, seed=VAL_PROMPT_SEED,
                                    cache_path=str(self.dir / f"real_stats_{self.frames}f_{self.config.eval.num_samples}.npz"))

    def evaluate(self, module) -> dict:
        """Rank 0 evaluates; the other ranks sample along only when the EMA is sharded (collective gathers)."""
        from apt.toy.metrics import evaluate_samples

        step = module.progress_step
        if step == self._last or not (rank_zero_only.rank == 0 or module.samples_on_every_rank):
            return {}
        self._last = step
        many = self.config.stage in MANY_STEP_STAGES
        steps = self.config.flow.sample_steps if many else 1
        cfg = self.config.flow.cfg_scale if many else 1.0
        seeds = [VAL_NOISE_SEED + i for i in range(len(self.prompts))]
        x = torch.cat([module.generate(self.prompts[i : i + 256], seeds[i : i + 256], steps=steps, cfg_scale=cfg) for i in range(0, len(self.prompts), 256)])
        if rank_zero_only.rank != 0:
            return {}
        self._setup()
        m = evaluate_samples(self._classifier, x.cpu(), self.prompts, self._real)
        result = {"step": step, "val_distance": float(m["distance"]), "val_attribute_accuracy": float(m["attribute_accuracy"])}
        module.log_dict({k: v for k, v in result.items() if k != "step"}, rank_zero_only=True)
        save_samples(x[:8], self.dir / f"step-{step:06d}")
        with open(self.dir / "history.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        return result

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = module.progress_step
        if self.every and step > 0 and step % self.every == 0:
            self.evaluate(module)
