"""Source of an in-house network package for the tests (tests/test_in_house.py, tests/test_lora.py).

``write_package(root)`` writes it as ``root/inhouse_apt_nets/__init__.py``, OUTSIDE the ``apt`` package; a test
puts ``root`` on sys.path and names ``inhouse_apt_nets:build`` in ``model.target``. The design is unlike the
built-in DiT on purpose: a Conv3d patch stem with a learned position table, text through cross-attention
(not a joint sequence), FiLM time conditioning, blocks that return a (visual, text) tuple and a
ConvTranspose3d head. The broken variants each violate one part of the backbone protocol.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = "inhouse_apt_nets"

SOURCE = '''
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context, key_mask=None):
        B, N, D = x.shape
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """Self-attention over the visual tokens, cross-attention to the text, an MLP; FiLM from the time."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.film = nn.Linear(dim, 2 * dim)

    def forward(self, h, context, context_mask, temb):
        scale, shift = self.film(temb)[:, None].chunk(2, -1)
        x = self.norm1(h) * (1 + scale) + shift
        h = h + self.self_attn(x, x)
        h = h + self.cross_attn(self.norm2(h), context, context_mask)
        h = h + self.fc2(F.gelu(self.fc1(self.norm3(h))))
        return h, context  # a tuple: visual_tokens picks the first


class CrossNet(nn.Module):
    def __init__(self, channels=3, frames=4, height=16, width=16, patch=4, dim=32, heads=4, depth=3, text_dim=64):
        super().__init__()
        self.hidden_dim = dim
        self.config = SimpleNamespace(num_heads=heads, prediction="velocity")
        self.patch = patch
        self.stem = nn.Conv3d(channels, dim, kernel_size=(1, patch, patch), stride=(1, patch, patch))
        self.pos = nn.Parameter(0.02 * torch.randn(frames, height // patch, width // patch, dim))
        self.text_in = nn.Linear(text_dim, dim)
        self.time_in = nn.Sequential(nn.Linear(64, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.layers = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.ConvTranspose3d(dim, channels, kernel_size=(1, patch, patch), stride=(1, patch, patch))

    @property
    def blocks(self):
        return self.layers

    def visual_tokens(self, block_output):
        return block_output[0]

    def forward(self, x_BCTHW, t_B, text):
        B, C, T, H, W = x_BCTHW.shape
        h = self.stem(x_BCTHW)                                    # (B, D, T, H/p, W/p)
        grid = h.shape[2:]
        h = h.flatten(2).transpose(1, 2) + self.pos[:T].reshape(-1, self.hidden_dim)
        freqs = torch.exp(-math.log(1000.0) * torch.arange(32, device=t_B.device) / 32)
        temb = self.time_in(torch.cat([torch.cos(t_B[:, None] * 1000 * freqs), torch.sin(t_B[:, None] * 1000 * freqs)], -1))
        context = self.text_in(text.emb_BLD)
        for block in self.layers:
            h, context = block(h, context, text.mask_BL, temb)
        h = self.head_norm(h).transpose(1, 2).reshape(B, self.hidden_dim, *grid)
        return self.head(h)


def build(**kwargs):
    return CrossNet(**kwargs)


# -- broken variants: each misses one part of the backbone protocol ------------------------------
class NoBlocks(CrossNet):
    blocks = None


class TransposedTokens(CrossNet):
    def visual_tokens(self, block_output):
        return block_output[0].transpose(1, 2)


class FirstFrameOnly(CrossNet):
    def forward(self, x_BCTHW, t_B, text):
        return super().forward(x_BCTHW, t_B, text)[:, :, :1]


def five_heads(**kwargs):
    net = CrossNet(**kwargs)
    net.config.num_heads = 5
    return net


def not_a_module(**kwargs):
    return "a string"
'''


def write_package(root: str | Path) -> Path:
    """Write the package under ``root`` (which the caller puts on sys.path); returns its directory."""
    d = Path(root) / PACKAGE
    d.mkdir(parents=True, exist_ok=True)
    (d / "__init__.py").write_text(SOURCE)
    return d
