"""A small 3D-conv classifier of the toy world: attribute heads + a feature space for distances.

It reads clips x (B, 3, T, 16, 16) in [-1, 1] for any T >= 1 (T = 1 is the image variant; it is
trained on T in {1, 4, 8}): four heads predict shape, colour, direction and background, and the
penultimate embedding `features(x)` (B, F) is the feature space for Fréchet distances, as
Inception pool3 / I3D logits are for FID / FVD (docs/design.md §4, "The toy benchmark").

Architecture (61k parameters): four convolutions, each GroupNorm + SiLU: 1x3x3 at 16x16, 3x3x3
(the only temporal one: motion) with stride 2 in space, 1x3x3 at 8x8, 1x3x3 with stride 2 to 4x4;
then mean and max pooling over (T, H, W), a linear + SiLU embedding (F = 128), one linear head per
attribute. Max pooling and the fourth layer's receptive field are what made shape learnable next
to the distractor (0.69 shape accuracy with three layers and mean pooling only). GroupNorm, not
BatchNorm, keeps every output independent of the other clips in the batch.

Shape legend: B batch, C channels, T frames, H height, W width, F feature dim, K classes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from apt.toy import world

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": world.SHAPES,
    "colour": tuple(world.COLOURS),
    "direction": tuple(world.DIRECTIONS),
    "background": tuple(world.BACKGROUNDS),
}
"""Head name -> class names, in logit order."""

DEFAULT_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "assets", "toy_classifier"
)
"""The checkpoint shipped in the repository (trained by experiments/train_toy_classifier.py)."""

_WEIGHTS, _CONFIG = "model.safetensors", "config.json"


@dataclass
class ToyClassifierConfig:
    widths: tuple[int, int, int, int] = (16, 32, 32, 64)
    """Channels of the four conv layers."""
    feature_dim: int = 128
    """F: size of the penultimate embedding used for Fréchet distances."""
    groups: int = 8
    """GroupNorm groups (must divide every width)."""


class ToyClassifier(nn.Module):
    def __init__(self, config: ToyClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ToyClassifierConfig()
        w1, w2, w3, w4 = config.widths
        spatial, spacetime = (1, 3, 3), (3, 3, 3)
        self.convs = nn.ModuleList(
            [
                nn.Conv3d(3, w1, spatial, padding=(0, 1, 1)),
                nn.Conv3d(w1, w2, spacetime, stride=(1, 2, 2), padding=1),
                nn.Conv3d(w2, w3, spatial, padding=(0, 1, 1)),
                nn.Conv3d(w3, w4, spatial, stride=(1, 2, 2), padding=(0, 1, 1)),
            ]
        )
        self.norms = nn.ModuleList([nn.GroupNorm(config.groups, w) for w in config.widths])
        self.embed = nn.Linear(2 * w4, config.feature_dim)
        self.heads = nn.ModuleDict(
            {name: nn.Linear(config.feature_dim, len(c)) for name, c in ATTRIBUTES.items()}
        )

    @property
    def num_features(self) -> int:  # torchmetrics FID reads this
        return self.config.feature_dim

    def features(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding (B, F) of clips in [-1, 1]."""
        if x_BCTHW.ndim != 5 or x_BCTHW.shape[1] != 3 or x_BCTHW.shape[-2:] != (world.SIZE, world.SIZE):
            raise ValueError(f"expected x (B, 3, T, {world.SIZE}, {world.SIZE}), got {tuple(x_BCTHW.shape)}")
        h = x_BCTHW.float()
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = F.silu(norm(conv(h)))
        pooled = torch.cat([h.mean(dim=(2, 3, 4)), h.amax(dim=(2, 3, 4))], dim=1)
        return F.silu(self.embed(pooled))

    def forward(self, x_BCTHW: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute head, {name: (B, K)}."""
        f_BF = self.features(x_BCTHW)
        return {name: head(f_BF) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x_BCTHW: torch.Tensor) -> dict[str, list[str]]:
        """Predicted class names per head, {name: [B strings]}."""
        return {
            name: [ATTRIBUTES[name][i] for i in logits_BK.argmax(-1).tolist()]
            for name, logits_BK in self(x_BCTHW).items()
        }


def save_toy_classifier(model: ToyClassifier, path: str, extra: dict | None = None) -> None:
    """Write `path/model.safetensors` and `path/config.json` (config + `extra`, e.g. accuracies)."""
    os.makedirs(path, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(path, _WEIGHTS + ".part"))
    os.chmod(os.path.join(path, _WEIGHTS + ".part"), 0o644)
    os.replace(os.path.join(path, _WEIGHTS + ".part"), os.path.join(path, _WEIGHTS))
    meta = {
        "config": asdict(model.config),
        "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
        **(extra or {}),
    }
    with open(os.path.join(path, _CONFIG + ".part"), "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(os.path.join(path, _CONFIG + ".part"), os.path.join(path, _CONFIG))


def load_toy_classifier(path: str = DEFAULT_PATH, device: str | torch.device = "cpu") -> ToyClassifier:
    """Load a saved classifier in eval mode with gradients off."""
    weights, config_path = os.path.join(path, _WEIGHTS), os.path.join(path, _CONFIG)
    for p in (weights, config_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"toy classifier file missing: {p} (train one with experiments/train_toy_classifier.py)"
            )
    with open(config_path) as f:
        meta = json.load(f)
    if meta.get("attributes") != {k: list(v) for k, v in ATTRIBUTES.items()}:
        raise ValueError(f"{config_path}: attribute classes differ from apt.toy.world; retrain the classifier")
    cfg = meta["config"]
    model = ToyClassifier(
        ToyClassifierConfig(widths=tuple(cfg["widths"]), feature_dim=cfg["feature_dim"], groups=cfg["groups"])
    )
    model.load_state_dict(load_file(weights))
    return model.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------- training data and loop


def toy_training_batch(
    rng: np.random.Generator, batch_size: int, frames: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fresh toy clips x (B, 3, T, 16, 16) in [-1, 1] and label indices {head: (B,)}.

    Images (frames == 1) get direction label -1 (ignored by the loss)."""
    attrs = [world.sample_attributes(rng, frames) for _ in range(batch_size)]
    pixels_BTHWC = np.stack([world.render_clip(a, rng, frames) for a in attrs])
    x_BCTHW = torch.from_numpy(pixels_BTHWC).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    labels = {
        name: torch.tensor(
            [-1 if getattr(a, name) is None else classes.index(getattr(a, name)) for a in attrs]
        )
        for name, classes in ATTRIBUTES.items()
    }
    return x_BCTHW, labels


@torch.no_grad()
def heldout_accuracy(
    model: ToyClassifier, frames: int, n: int = 2000, seed: int = 10_000, batch_size: int = 250
) -> dict[str, float]:
    """Per-head accuracy on `n` real clips `world.make_sample(i, seed, frames)`; no direction for images."""
    model.eval()
    correct = {name: 0 for name in ATTRIBUTES}
    for start in range(0, n, batch_size):
        samples = [world.make_sample(i, seed, frames) for i in range(start, min(start + batch_size, n))]
        x_BCTHW = (
            torch.from_numpy(np.stack([s["pixels"] for s in samples])).permute(0, 4, 1, 2, 3).float() / 127.5
            - 1.0
        )
        pred = model.predict(x_BCTHW)
        for name in ATTRIBUTES:
            correct[name] += sum(
                p == getattr(s["attributes"], name) for p, s in zip(pred[name], samples, strict=True)
            )
    heads = [h for h in ATTRIBUTES if frames > 1 or h != "direction"]
    return {h: correct[h] / n for h in heads}


def train_toy_classifier(
    *,
    steps: int = 800,
    batch_size: int = 64,
    lr: float = 3e-3,
    frames_cycle: tuple[int, ...] = (8, 1, 8, 4),
    seed: int = 0,
    config: ToyClassifierConfig | None = None,
    log_every: int = 100,
) -> ToyClassifier:
    """Train on freshly rendered clips (never the same clip twice), cycling clip lengths per step.

    AdamW with cosine decay; cross-entropy summed over heads (direction ignored for images).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 0xC1A55])
    model = ToyClassifier(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    t0 = time.time()
    for step in range(steps):
        x_BCTHW, labels = toy_training_batch(rng, batch_size, frames_cycle[step % len(frames_cycle)])
        logits = model(x_BCTHW)
        loss = sum(
            F.cross_entropy(logits[h], labels[h], ignore_index=-1)
            for h in ATTRIBUTES
            if (labels[h] >= 0).any()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    return model.eval()
