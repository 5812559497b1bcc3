"""APT discriminator: a diffusion backbone + cross-attention readout heads at several depths.

APT (arXiv 2501.08316 §3.3): D is initialised from the ORIGINAL diffusion weights (all trained).
New cross-attention-only blocks read out the visual tokens at layers 16, 26, 36 of 36: each has one
learnable query token attending to that layer's tokens, followed by an MLP. The head outputs are
concatenated, normalised (LayerNorm) and projected to one scalar logit. D sees clean inputs; its
timestep input is drawn per sample from shift(U(0, 1), s) (the "timestep ensemble").

Legend: B batch, N visual tokens, D width, K number of readout heads.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from apt.flow import sample_timesteps
from apt.models.backbone import Backbone, TextCond, joined, readout_layers, tap_hidden_states


class ReadoutHead(nn.Module):
    """One learnable query token cross-attends to a layer's visual tokens, then an MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, h_BND: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(h_BND)
        q = self.query.expand(h_BND.shape[0], -1, -1).to(kv.dtype)
        x = q + self.attn(q, kv, kv, need_weights=False)[0]
        x = x + self.mlp(self.norm_mlp(x))
        return x[:, 0]  # (B, D)


class _ReadoutDone(Exception):
    """Raised by a hook once the deepest readout layer has run: later blocks are not needed."""


class Discriminator(nn.Module):
    def __init__(self, backbone: Backbone, *, fractions: list[float], num_heads: int = 4, timestep_shift: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.layers = readout_layers(len(backbone.blocks), fractions)
        dim = backbone.hidden_dim
        self.heads = nn.ModuleList([ReadoutHead(dim, num_heads) for _ in self.layers])
        self.norm = nn.LayerNorm(dim * len(self.layers))
        self.proj = nn.Linear(dim * len(self.layers), 1)
        self.timestep_shift = timestep_shift

    def sample_t(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """The timestep ensemble: one t ~ shift(U(0, 1), s) per sample."""
        return sample_timesteps(n, shift=self.timestep_shift, distribution="uniform", generator=generator).to(device)

    def forward(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text: TextCond) -> torch.Tensor:
        """Logits (B,) for clean inputs x at ensemble timesteps t."""
        return self.logit(self.readout(x_BCTHW, t_B, text))

    def logit(self, feats_BKD: torch.Tensor) -> torch.Tensor:
        """LayerNorm -> Linear of the concatenated readout features (B, K * D) -> logits (B,).

        The logit in fp32 under bf16 autocast and with bf16 parameters (DeepSpeed bf16): approximate R1
        differences D(x) - D(x + sigma n) are far below bf16's resolution at sigma = 0.01.
        """
        with torch.autocast(device_type=feats_BKD.device.type, enabled=False):
            n, p = self.norm, self.proj
            h = F.layer_norm(feats_BKD.float(), n.normalized_shape, n.weight.float(), n.bias.float(), n.eps)
            return F.linear(h, p.weight.float(), p.bias.float()).squeeze(-1)

    def readout(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text: TextCond, **forward_kwargs) -> torch.Tensor:
        """The readout heads' outputs, concatenated (B, K * D): what the logit is a linear function of, after LayerNorm
        (``forward_kwargs``: as ``hidden_states``)."""
        hidden = self.hidden_states(x_BCTHW, t_B, text, **forward_kwargs)
        return torch.cat([head(hidden[i]) for head, i in zip(self.heads, self.layers)], dim=-1)

    def hidden_states(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text: TextCond, **forward_kwargs) -> dict[int, torch.Tensor]:
        """The visual tokens (B, N, D) leaving each readout layer; the blocks after the deepest one are skipped.

        ``forward_kwargs`` go to the backbone (a causal one's recycled chunk and cache: ``prev_BCTHW``, ``cache``); a
        cached step stopped after the deepest readout layer still counts its chunk as written. A clean-context backbone
        runs every block: its clean pass (or re-encode) comes first, and the pass read is the last one."""
        last = self.layers[-1]
        clean = getattr(getattr(self.backbone, "config", None), "clean_context", False)
        if clean:
            last = len(self.backbone.blocks) - 1

        def stop(_module, _inputs, _output):
            raise _ReadoutDone

        with tap_hidden_states(self.backbone, self.layers) as hidden:
            handle = self.backbone.blocks[last].register_forward_hook(stop) if last < len(self.backbone.blocks) - 1 else None
            try:
                out = self.backbone(x_BCTHW, t_B, text, **forward_kwargs)  # the velocity output is not used, but with a clean
                if clean:  # context it carries the clean pass's last block, whose backward FSDP2 must see
                    hidden[self.layers[-1]] = joined(hidden[self.layers[-1]], out)
            except _ReadoutDone:
                if forward_kwargs.get("cache") is not None:
                    forward_kwargs["cache"].commit()  # its layers up to the deepest readout one are written; later ones are never read
            finally:
                if handle is not None:
                    handle.remove()
        return hidden
