"""The backbone protocol: what the teacher, generator and discriminator need from a transformer.

Every network in apt (the built-in DiT, each diffusers adapter, a user's in-house model) is used
through this one interface (docs/design.md §2):

- ``forward(x_BCTHW, t_B, text) -> v_BCTHW``: predict the rectified-flow velocity ``eps - x0``.
- ``blocks``: the ordered list of transformer blocks, so readout heads can tap hidden states.
- ``visual_tokens(block_output) -> h_BND``: the visual-token part of one block's output (joint
  attention models carry text tokens in the same sequence; diffusers blocks return tuples).
- ``hidden_dim``: width D of the tapped hidden states.
- ``config.num_heads`` (heads of the discriminator's readout attention, dividing ``hidden_dim``) and
  ``config.prediction`` (velocity | x0, what the teacher stage's loss compares).

``check_backbone`` verifies all of it on a network (an in-house one, ``apt.models.in_house``) and fails
in one line naming what is missing or wrong.

Legend: B batch, C channels, T frames, H/W height/width, N tokens, L text tokens, D width.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class TextCond:
    """Encoded text: token embeddings, their validity mask and (optionally) a pooled vector.

    ``pooled_BP`` is the pooled text embedding some diffusers families take besides the token
    sequence (SD3/FLUX/HunyuanVideo ``pooled_projections``, from a CLIP text encoder). It is None
    for the built-in DiT and wherever no pooled encoder is used; adapters then substitute zeros.
    """

    emb_BLD: torch.Tensor
    mask_BL: torch.Tensor  # bool, True where a token is real
    pooled_BP: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "TextCond":
        pooled = None if self.pooled_BP is None else self.pooled_BP.to(device=device, dtype=dtype)
        return TextCond(self.emb_BLD.to(device=device, dtype=dtype), self.mask_BL.to(device), pooled)

    def __getitem__(self, idx) -> "TextCond":
        return TextCond(self.emb_BLD[idx], self.mask_BL[idx], None if self.pooled_BP is None else self.pooled_BP[idx])

    @staticmethod
    def cat(conds: list["TextCond"]) -> "TextCond":
        """Concatenate along the batch, padding to the longest text (pooled vectors: all or none)."""
        L = max(c.emb_BLD.shape[1] for c in conds)
        embs, masks = [], []
        for c in conds:
            pad = L - c.emb_BLD.shape[1]
            embs.append(nn.functional.pad(c.emb_BLD, (0, 0, 0, pad)))
            masks.append(nn.functional.pad(c.mask_BL, (0, pad), value=False))
        pooled = [c.pooled_BP for c in conds]
        if any(p is None for p in pooled):
            if not all(p is None for p in pooled):
                raise ValueError("TextCond.cat: some conditions have pooled_BP and some do not")
            return TextCond(torch.cat(embs), torch.cat(masks))
        return TextCond(torch.cat(embs), torch.cat(masks), torch.cat(pooled))

    def nearest_other(self) -> "TextCond":
        """Each sample gets the most similar DIFFERENT text of the batch (cosine of the masked-mean token
        embeddings): a hard negative for a matching-aware discriminator. A sample whose text every other
        sample shares keeps the text of its neighbour along the batch."""
        B = self.emb_BLD.shape[0]
        mask = self.mask_BL[..., None].to(self.emb_BLD.dtype)
        mean_BD = nn.functional.normalize((self.emb_BLD * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1).float()
        sim_BB = mean_BD @ mean_BD.T
        same_BB = sim_BB > 1 - 1e-6  # itself and identical texts
        idx_B = sim_BB.masked_fill(same_BB, -float("inf")).argmax(1)
        neighbour_B = torch.arange(B, device=idx_B.device).roll(1)
        idx_B = torch.where(same_BB.all(1), neighbour_B, idx_B)
        return self[idx_B]

    def repeat(self, n: int) -> "TextCond":
        pooled = None if self.pooled_BP is None else self.pooled_BP.repeat(n, 1)
        return TextCond(self.emb_BLD.repeat(n, 1, 1), self.mask_BL.repeat(n, 1), pooled)


@runtime_checkable
class Backbone(Protocol):
    hidden_dim: int

    @property
    def blocks(self) -> nn.ModuleList: ...

    def forward(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text: TextCond) -> torch.Tensor: ...

    def visual_tokens(self, block_output) -> torch.Tensor: ...


def readout_layers(num_blocks: int, fractions: list[float]) -> list[int]:
    """Block indices (0-based) whose outputs sit at the given fractions of depth.

    The APT paper taps layers 16, 26, 36 of 36 (fractions 16/36, 26/36, 1): for a depth-36
    backbone this returns [15, 25, 35]; for any other depth the same proportions, rounded.
    """
    if num_blocks < 1:
        raise ValueError(f"backbone has no blocks (num_blocks={num_blocks})")
    out = []
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"readout fraction must be in (0, 1], got {f}")
        out.append(max(1, min(num_blocks, round(f * num_blocks))) - 1)
    return sorted(set(out))


@contextlib.contextmanager
def tap_hidden_states(backbone: Backbone, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Capture the visual tokens leaving the given blocks during the forward passes in the block.

    Yields a dict filled by forward hooks: ``{layer_index: h_BND}`` (last forward wins).
    """
    blocks = backbone.blocks
    for i in layers:
        if not 0 <= i < len(blocks):
            raise IndexError(f"readout layer {i} out of range for a backbone with {len(blocks)} blocks")
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for i in layers:

        def hook(_module, _inputs, output, i=i):
            captured[i] = backbone.visual_tokens(output)

        handles.append(blocks[i].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def joined(out: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
    """``out`` plus zero times ``hidden``, a block's output that nothing else reads (e.g. the last block of a causal
    DiT's clean pass, read only through its keys and values). The values are unchanged; the gradient reaches that
    output, as FSDP2 needs: it gathers a block's sharded parameters for the block's backward when its output receives
    a gradient, and otherwise that block's backward (through its keys and values) would run on freed parameters."""
    if hidden is None or not torch.is_grad_enabled() or not hidden.requires_grad:
        return out
    return out + 0.0 * hidden.sum()


class BackboneForwardError(ValueError):
    """The network's forward raised during ``check_backbone`` (the message names the input shapes)."""


def check_backbone(net: nn.Module, *, input_CTHW: tuple[int, int, int, int], text_dim: int, name: str = "the network",
                   device: str | torch.device = "cpu") -> None:
    """Raise ValueError, in one line naming what is missing or wrong, unless ``net`` speaks the backbone protocol.

    Members first (``blocks``, ``visual_tokens``, ``hidden_dim``, ``config.num_heads`` dividing ``hidden_dim``,
    ``config.prediction``), then one forward at batch 1 of an input shaped ``input_CTHW`` (data.channels,
    frames, height, width) with a 4-token text of width ``text_dim``: the output must be shaped like the input,
    and ``visual_tokens`` of every block's output must be (1, N, hidden_dim). ``device="meta"`` checks
    shapes without compute (``apt.models.in_house`` builds a meta copy for it)."""
    blocks = getattr(net, "blocks", None)
    if blocks is None:
        raise ValueError(f"{name} has no `blocks`: the backbone protocol needs its transformer blocks in execution order as an nn.ModuleList (docs/byo_model.md §1)")
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        what = f"an empty {type(blocks).__name__}" if isinstance(blocks, nn.ModuleList) else f"a {type(blocks).__name__}"
        raise ValueError(f"{name}: `blocks` is {what}; the backbone protocol needs a non-empty nn.ModuleList of transformer blocks")
    if not callable(getattr(net, "visual_tokens", None)):
        raise ValueError(f"{name} has no `visual_tokens(block_output)` method returning a block's visual tokens (B, N, hidden_dim)")
    D = getattr(net, "hidden_dim", None)
    if not isinstance(D, int) or isinstance(D, bool) or D <= 0:
        raise ValueError(f"{name}: `hidden_dim` must be a positive int (the width of the visual tokens), got {D!r}")
    config = getattr(net, "config", None)
    heads = getattr(config, "num_heads", None)
    if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0:
        raise ValueError(f"{name}: `config.num_heads` must be a positive int (heads of the discriminator's readout attention), got {heads!r}")
    if D % heads:
        raise ValueError(f"{name}: hidden_dim {D} does not divide into config.num_heads={heads} readout heads")
    prediction = getattr(config, "prediction", None)
    if prediction not in ("velocity", "x0"):
        raise ValueError(f"{name}: `config.prediction` must be 'velocity' or 'x0' (what the teacher stage's loss compares), got {prediction!r}")

    C, T, H, W = input_CTHW
    x = torch.zeros(1, C, T, H, W, device=device)
    text = TextCond(torch.zeros(1, 4, text_dim, device=device), torch.ones(1, 4, dtype=torch.bool, device=device))
    outputs: dict[int, object] = {}
    handles = [b.register_forward_hook(lambda _m, _i, out, i=i: outputs.__setitem__(i, out)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad(), torch.device(device):  # tensors the forward makes land beside the input
            v = net(x, torch.full((1,), 0.5, device=device), text)
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward, reported with the shapes it was given
        raise BackboneForwardError(f"{name}: forward on x {tuple(x.shape)} (data.channels, frames, height, width) and text (1, 4, {text_dim}) "
                                   f"(text.encoder width) failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        for h in handles:
            h.remove()
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(x.shape):
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{name}: forward returned {got} for an input of shape {tuple(x.shape)}; the velocity must have the input's shape")
    for i in range(len(blocks)):
        if i not in outputs:
            raise ValueError(f"{name}: blocks[{i}] did not run in the forward; `blocks` must list the blocks the forward calls")
        h = net.visual_tokens(outputs[i])
        shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        if not isinstance(h, torch.Tensor) or h.dim() != 3 or h.shape[0] != 1 or h.shape[2] != D or h.shape[1] == 0:
            raise ValueError(f"{name}: visual_tokens(output of blocks[{i}]) returned {shape}; expected (1, N, hidden_dim={D}) for a batch of 1")
