"""What every stage's LightningModule shares: config, text encoder, a private RNG, progress
counters and the checkpoint hooks that make resume exact.

Exact resume: all training randomness (noise, timesteps, caption dropout) comes from ``self.rng``,
a torch.Generator saved in every checkpoint, and the data stream is rebuilt from its seed and
skips ``batches_consumed`` batches. Frozen networks (the text encoder, a teacher) are not saved, nor
the frozen base of a LoRA network (``add_lora``): its checkpoint file holds the adapters only.
"""

from __future__ import annotations

import contextlib
import math
from copy import deepcopy
from typing import ContextManager

import lightning as L
import torch
from torch import nn

from apt import lora
from apt.config import Config, to_yaml
from apt.ema import ema_update
from apt.lit.data import batch_parts
from apt.methods.update import check_finite
from apt.models import TextCond, factory
from apt.text import TextEncoder

FROZEN_PREFIXES = ("text_encoder.", "teacher.")


class StageModule(L.LightningModule):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.text_encoder = TextEncoder.load(config.text.encoder, max_length=config.text.max_length)
        self.rng = torch.Generator().manual_seed(config.train.seed)
        self.batches_consumed = 0
        self.lora_nets: tuple[str, ...] = ()  # attributes holding LoRA networks (add_lora)

    # -- building blocks ---------------------------------------------------------------------
    def build_backbone(self) -> nn.Module:
        return factory.build_backbone(self.config, text_dim=self.text_encoder.dim)

    def load_backbone(self, path: str, name: str) -> nn.Module:
        """A backbone of this run's model with weights ``name`` from a checkpoint (e.g. net_ema)."""
        return factory.load_backbone(self.config, path, name, text_dim=self.text_encoder.dim)

    @staticmethod
    def frozen_copy(net: nn.Module) -> nn.Module:
        return deepcopy(net).requires_grad_(False).eval()

    def add_lora(self, net: nn.Module, attr: str) -> nn.Module:
        """Freeze ``net`` and give it trained + EMA adapters (``apt.lora``); it will be held as ``self.<attr>``,
        whose checkpoint file then keeps the adapters only. Records the base in ``config.lora.base``."""
        self.config.lora.base = lora.resolve_base(self.config)
        lora.add_adapters(net, self.config.lora, self.config.model.source)
        self.lora_nets = (*self.lora_nets, attr)
        return net

    def trainable_parameters(self, net: nn.Module) -> list[nn.Parameter]:
        """What the optimiser of ``net`` steps: every parameter, or a LoRA network's trained adapters."""
        return [p for p in net.parameters() if p.requires_grad]

    def encode(self, captions: list[str], *, allow_empty: bool = False) -> TextCond:
        return self.text_encoder.encode(captions, allow_empty=allow_empty).to(self.device)

    def encode_batch(self, batch: dict) -> TextCond:
        """The batch's text: pre-encoded embeddings from latent shards when present, else its captions encoded now."""
        if "text_emb" in batch:
            return TextCond(batch["text_emb"], batch["text_mask"], batch.get("text_pooled")).to(self.device)
        return self.encode(batch["caption"])

    def decode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Latent samples -> pixels in [-1, 1] through model.vae (identity for pixel-space models).

        The codec is held outside the module tree so it is neither trained nor checkpointed."""
        if not self.config.model.vae:
            return x
        if "_codec" not in self.__dict__:
            from apt.codecs import LatentCodec

            self.__dict__["_codec"] = LatentCodec.load(self.config.model.vae)
        codec = self.__dict__["_codec"].to(x.device)
        return codec.decode(x, batch_size=1)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.rng).to(self.device)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.rng).to(self.device)

    # -- progress ----------------------------------------------------------------------------
    @property
    def progress_step(self) -> int:
        """The stage's own step count (optimiser steps; APT overrides with generator updates)."""
        return self.trainer.global_step

    @property
    def done(self) -> bool:
        return self.progress_step >= self.config.train.max_steps

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # Counted before the step so a checkpoint written by any callback after it includes this batch.
        self.batches_consumed += len(batch) if isinstance(batch, list) else 1  # a list: the APT step's micro-batches

    # -- sampling (EMA network; used by the sample callback and the CLI) ---------------------
    def sampling_network(self) -> nn.Module:
        raise NotImplementedError

    @property
    def samples_on_every_rank(self) -> bool:
        """True when the sampling network is sharded over ranks (APT's EMA under FSDP2 / ZeRO-3): its gathers
        are collective, so every rank calls ``generate`` together (rank 0 writes); else rank 0 alone samples."""
        return False

    def gathered_sampling_network(self) -> ContextManager[nn.Module]:
        """The sampling network, ready for a forward for the duration of the context (a sharded one gathered)."""
        return contextlib.nullcontext(self.sampling_network())

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], *, steps: int, cfg_scale: float = 1.0, frames: int | None = None) -> torch.Tensor:
        from apt.inference import sample

        with self.gathered_sampling_network() as net:
            x = sample(net, self.text_encoder, self.config, prompts, seeds, steps=steps, cfg_scale=cfg_scale, frames=frames, device=self.device)
        return self.decode_latents(x)

    # -- checkpoint hooks ----------------------------------------------------------------------
    def saved_key(self, key: str) -> bool:
        """Whether a state-dict entry goes into checkpoints: not a frozen network, nor a LoRA network's base."""
        if key.startswith(FROZEN_PREFIXES):
            return False
        return key.partition(".")[0] not in self.lora_nets or lora.is_adapter_key(key)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self.saved_key(k)}
        checkpoint["apt"] = {"rng": self.rng.get_state(), "batches_consumed": self.batches_consumed, **self.extra_state()}
        checkpoint["apt_config_yaml"] = to_yaml(self.config)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        own = self.state_dict()
        for k, v in own.items():  # frozen networks (and LoRA bases) come from their own sources, not the checkpoint
            if not self.saved_key(k):
                checkpoint["state_dict"][k] = v
        state = checkpoint["apt"]
        self.rng.set_state(state["rng"])
        self.batches_consumed = state["batches_consumed"]
        self.load_extra_state(state)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def check_finite(self, name: str, value: torch.Tensor) -> None:
        check_finite(name, value, f"step {self.progress_step} (batch {self.batches_consumed})")

    def trainer_max_steps(self) -> int:
        """Lightning's max_steps (it counts optimiser steps); APT overrides."""
        return self.config.train.max_steps


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str, decay_steps: int = 0) -> float:
    """Multiplier of optim.lr before optimiser step ``step`` (0-based): linear warm-up to 1 over
    ``warmup_steps``, then 1 (constant) or a half cosine reaching 0 at ``max_steps`` (cosine); with
    ``decay_steps`` > 0 the cosine spans only the last ``decay_steps`` steps (at most every step after the
    warm-up) and the factor is 1 before."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    start = max(warmup_steps, max_steps - decay_steps) if decay_steps else warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0, step - start) / max(1, max_steps - start))))


class EmaNetModule(StageModule):
    """A stage that trains one network ``net`` on a per-batch loss and samples from its EMA ``net_ema``
    (teacher pretraining, distillation). Subclasses set ``net``/``net_ema`` and define ``part_loss``."""

    loss_label = "loss"

    def part_loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def sampling_network(self) -> nn.Module:
        return self.net_ema

    def gathered_sampling_network(self) -> ContextManager[nn.Module]:
        if self.lora_nets:  # base + EMA adapters: the same module with its EMA adapters on
            return lora.ema_adapters(self.net)
        return super().gathered_sampling_network()

    def training_step(self, batch, batch_idx):
        loss = sum(self.part_loss(part) for part in batch_parts(batch))  # video (+ image) batches
        self.check_finite(self.loss_label, loss)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        """AdamW on ``net``: linear warm-up over optim.warmup_steps, then optim.schedule (constant | cosine to 0,
        over the last optim.decay_steps if set)."""
        o, max_steps = self.config.optim, self.config.train.max_steps
        opt = torch.optim.AdamW(self.trainable_parameters(self.net), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, o.warmup_steps, max_steps, o.schedule, o.decay_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Inside the step, so callbacks (checkpoints, samples) always see the updated EMA.
        if self.lora_nets:
            lora.ema_update_adapters(self.net, self.config.train.ema_decay)
        else:
            ema_update(self.net_ema, self.net, self.config.train.ema_decay)
