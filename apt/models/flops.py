"""Analytic FLOP counts of the built-in DiT (forward) and of one APT training step.

Convention (as PaLM / FlashAttention count them): a multiply-add is 2 FLOPs; only matmuls count
(norms, activations, softmax, RoPE are left out). For a forward pass:

    linear    = 2 * (params of the layers that see each token) * tokens, summed over token sets
                (block linears see all S = L + N tokens; the patch embedding and output projection
                the N visual tokens; the text projection the L text tokens; the timestep/pooled-text
                MLPs and adaLN modulations one vector per sample)
    attention = 4 * S^2 * D per layer (Q K^T and P V, each 2 * S^2 * D)

``count_flops`` measures the same quantity with ``torch.utils.flop_counter.FlopCounterMode`` (it
counts mm/addmm/bmm/SDPA); tests/test_perf.py checks the two agree exactly on the tiny flavour.

Legend: B batch, N visual tokens, L text tokens, S = L + N, D width, P values per patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from apt.models.dit import DiTConfig


@dataclass(frozen=True)
class Flops:
    """FLOPs split into matmuls of linear layers and of attention (QK^T, PV)."""

    linear: float
    attention: float

    @property
    def total(self) -> float:
        return self.linear + self.attention

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.linear + other.linear, self.attention + other.attention)

    def scale(self, linear: float, attention: float | None = None) -> "Flops":
        return Flops(self.linear * linear, self.attention * (linear if attention is None else attention))


def visual_tokens(config: DiTConfig, *, frames: int, height: int, width: int) -> int:
    """Visual tokens N of a (frames, height, width) input in the DiT's own space (latent or pixels).

    An image (1 frame) is repeated to fill one temporal patch, as ``DiT.forward`` does.
    """
    pt, ph, pw = config.patch_size
    t = 1 if (frames == 1 and pt > 1) else frames // pt
    return t * (height // ph) * (width // pw)


def dit_forward_flops(
    config: DiTConfig, *, batch: int, frames: int, height: int, width: int, text_tokens: int,
    num_blocks: int | None = None, include_output: bool = True,
) -> Flops:
    """Forward FLOPs of ``DiT(config)`` on a (batch, C, frames, height, width) input with L text tokens.

    ``num_blocks`` / ``include_output``: count only the first blocks and skip the output layers
    (the discriminator stops its backbone after the deepest readout layer).
    """
    c = config
    D, L = c.hidden_dim, text_tokens
    N = visual_tokens(c, frames=frames, height=height, width=width)
    S = L + N
    P = c.in_channels * c.patch_size[0] * c.patch_size[1] * c.patch_size[2]
    hidden = int(D * c.mlp_ratio)
    blocks = c.depth if num_blocks is None else num_blocks

    per_block_token_params = 3 * D * D + D * D + 2 * D * hidden  # qkv, proj, MLP: see all S tokens
    per_block_sample_params = D * 6 * D  # adaLN modulation: one vector per sample
    linear = N * P * D + L * c.text_dim * D  # patch embedding, text projection
    linear += (256 * D + D * D) + (c.text_dim * D + D * D)  # timestep MLP, pooled-text MLP (per sample)
    linear += blocks * (S * per_block_token_params + per_block_sample_params)
    if include_output:
        linear += D * 2 * D + N * D * P  # final modulation (per sample), output projection
    attention = blocks * 4 * S * S * D
    return Flops(2.0 * batch * linear, float(batch * attention))


def readout_head_flops(dim: int, *, batch: int, tokens: int, num_heads: int, mlp_ratio: float = 4.0) -> Flops:
    """Forward FLOPs of the discriminator's readout heads (``apt.discriminator.ReadoutHead``) + logit.

    Per head: query projection (1 token), key/value projections (N tokens), attention of one query
    over N keys, output projection and MLP (1 token); then the (K D -> 1) logit projection.
    """
    hidden = int(dim * mlp_ratio)
    per_head_linear = dim * dim + tokens * 2 * dim * dim + dim * dim + 2 * dim * hidden
    linear = num_heads * per_head_linear + num_heads * dim
    return Flops(2.0 * batch * linear, float(batch * num_heads * 4 * tokens * dim))


def _input_grad_skipped(
    config: DiTConfig, *, batch: int, visual: int, text_tokens: int, frozen_blocks: int | None = None, heads: int = 0,
) -> float:
    """Backward matmuls autograd skips because their input needs no gradient.

    Trained network (``frozen_blocks=None``) fed inputs without grad: the input gradients of the
    first layers (patch embedding, text projection, first layers of the timestep and pooled-text
    MLPs). Frozen network fed an input with grad (D in the G step): everything on the path of the
    conditioning vector c (timestep/pooled-text MLPs, every adaLN modulation), the text
    projection, and the readout queries' projections (their queries are parameters).
    """
    pt, ph, pw = config.patch_size
    D, L, P, Dt = config.hidden_dim, text_tokens, config.in_channels * pt * ph * pw, config.text_dim
    if frozen_blocks is None:
        macs = visual * P * D + L * Dt * D + 256 * D + Dt * D
    else:
        macs = L * Dt * D + (256 * D + D * D) + (Dt * D + D * D) + frozen_blocks * 6 * D * D + heads * D * D
    return 2.0 * batch * macs


def apt_step_flops(
    config: DiTConfig, *, batch: int, frames: int, height: int, width: int, text_tokens: int,
    readout_layers: list[int], checkpointing: bool = False, checkpoint_policy: str = "full",
) -> dict[str, float]:
    """FLOPs of one APT update (one D step + one G step, ``apt.lit.apt.AptModule.training_step``).

    Model FLOPs (for MFU; backward = 2x forward):
      D step: G forward without grad on B; D forward on 3B (real, perturbed real, fake), backward
      with weight and input gradients (2x forward).
      G step: G forward on B, D forward on B, backward through the frozen D (input gradients only:
      1x forward for linear layers, 2x for attention), backward through G (2x forward).
      Minus the backward matmuls autograd skips (``_input_grad_skipped``; < 1% at real sizes).
    Hardware FLOPs add what the kernels actually redo: the attention backward recomputes the scores
    Q K^T (+0.5x the attention forward per backward, as FlopCounterMode counts it) and, with
    activation ``checkpointing``, every block's forward runs again in backward: all its matmuls
    (``checkpoint_policy`` full), its linear layers only (attention: SDPA outputs kept), or none
    (attention_and_matmul: ``apt.models.checkpointing``).
    """
    shape = dict(frames=frames, height=height, width=width, text_tokens=text_tokens)
    last = max(readout_layers)
    full_d = last == config.depth - 1
    N = visual_tokens(config, frames=frames, height=height, width=width)
    K = len(readout_layers)

    def g(b: int) -> Flops:
        return dit_forward_flops(config, batch=b, **shape)

    def d(b: int, *, output: bool = full_d) -> Flops:
        # At full depth D's backbone also computes its (unused) velocity output: it runs forward,
        # but no gradient reaches it (``output=False`` for the backward passes).
        backbone = dit_forward_flops(config, batch=b, num_blocks=last + 1, include_output=output, **shape)
        return backbone + readout_head_flops(config.hidden_dim, batch=b, tokens=N, num_heads=K)

    skipped = dict(visual=N, text_tokens=text_tokens)
    d_step = (g(batch) + d(3 * batch) + d(3 * batch, output=False).scale(2.0)).total
    d_step -= _input_grad_skipped(config, batch=3 * batch, **skipped)
    g_step = (g(batch) + d(batch) + d(batch, output=False).scale(1.0, 2.0) + g(batch).scale(2.0)).total
    g_step -= _input_grad_skipped(config, batch=batch, **skipped)
    g_step -= _input_grad_skipped(config, batch=batch, frozen_blocks=last + 1, heads=K, **skipped)
    backward_through = [d(3 * batch, output=False), d(batch, output=False), g(batch)]  # networks that run backward in this step
    score_recompute = sum(0.5 * f.attention for f in backward_through)
    block_recompute = 0.0
    if checkpointing:  # the blocks' forward again, for D on 3B and B (up to its last readout) and G on B

        linear_again = checkpoint_policy in ("full", "attention")  # attention_and_matmul keeps every matmul output
        attention_again = checkpoint_policy == "full"

        def blocks_only(b: int, n: int) -> float:
            with_blocks = dit_forward_flops(config, batch=b, num_blocks=n, include_output=False, **shape)
            without = dit_forward_flops(config, batch=b, num_blocks=0, include_output=False, **shape)
            return linear_again * (with_blocks.linear - without.linear) + attention_again * (with_blocks.attention - without.attention)

        block_recompute = blocks_only(3 * batch, last + 1) + blocks_only(batch, last + 1) + blocks_only(batch, config.depth)
    model = d_step + g_step
    return {"d_step": d_step, "g_step": g_step, "model": model, "hardware": model + score_recompute + block_recompute}


_CPU_SDPA_REGISTERED = False


def _register_cpu_sdpa() -> None:
    """FlopCounterMode knows the CUDA SDPA kernels, not the CPU flash kernel ``auto`` picks on CPU."""
    global _CPU_SDPA_REGISTERED
    if _CPU_SDPA_REGISTERED:
        return
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry:

        @fc.register_flop_formula(fwd)
        def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd is not None and bwd not in fc.flop_registry:

        @fc.register_flop_formula(bwd)
        def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    _CPU_SDPA_REGISTERED = True


def count_flops(fn: Callable[[], object]) -> tuple[int, object]:
    """(FLOPs counted by ``FlopCounterMode``, fn's result) for one call of ``fn()``."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa()
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), result
