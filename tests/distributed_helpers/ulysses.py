"""Ulysses sequence parallelism on the ranks of this process group equals full attention.

    torchrun --nproc_per_node 2 tests/distributed_helpers/ulysses.py OUT.json

Every rank builds the same inputs and weights (fixed seeds), computes the full (single-device)
result, then the sequence-parallel one on its chunk, and compares: attention outputs and q/k/v
gradients; a tiny DiT (joint sequence 37 tokens: padded to 38) output and its parameter gradients
averaged over ranks; a discriminator whose readout re-gathers mid-network. Rank 0 writes the
largest relative differences to OUT.json.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from apt.discriminator import Discriminator  # noqa: E402
from apt.distributed.sequence_parallel import UlyssesAttention, apply_sequence_parallel  # noqa: E402
from apt.models import TextCond, build_dit  # noqa: E402
from apt.models.attention import attention, sequence_parallel_attention  # noqa: E402
from tests.distributed_helpers.gloo_report import run_and_report  # noqa: E402


def maxdiff(a, b) -> float:
    """Largest absolute difference, relative to the reference's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def averaged_grads(net) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in net.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        out[name] = g / dist.get_world_size()
    return out


def compare() -> dict:
    """Every comparison; the networks and attention wrappers (which hold the group) are freed on return."""
    P, rank = dist.get_world_size(), dist.get_rank()
    report = {}

    # 1. Attention alone: (B, K, S, E) with a key mask, S divisible by P.
    torch.manual_seed(0)
    B, K, S, E = 2, 4, 12, 8
    q, k, v = (torch.randn(B, K, S, E, requires_grad=True) for _ in range(3))
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[1, ..., S - 3:] = False
    w = torch.randn(B, K, S, E)
    full = attention(q, k, v, mask)
    (full * w).sum().backward()
    chunk = slice(rank * S // P, (rank + 1) * S // P)
    ql, kl, vl = (t.detach()[:, :, chunk].clone().requires_grad_() for t in (q, k, v))
    ulysses = UlyssesAttention()
    with sequence_parallel_attention(ulysses):
        local = attention(ql, kl, vl, mask)
    (local * w[:, :, chunk]).sum().backward()
    report["attention_out"] = maxdiff(local, full[:, :, chunk])
    report["attention_grad_qkv"] = max(maxdiff(a.grad, b.grad[:, :, chunk]) for a, b in zip((ql, kl, vl), (q, k, v)))

    # 2. A tiny DiT: 5 text tokens (2 padded) + 32 visual = 37 tokens, not divisible by P = 2.
    torch.manual_seed(1)
    net = build_dit("tiny", text_dim=16)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(2, 3, 4, 16, 16), torch.rand(2)
    text = TextCond(torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    w_out = torch.randn(2, 3, 4, 16, 16)
    sp_net = copy.deepcopy(net)
    apply_sequence_parallel(sp_net)
    full = net(x, t, text)
    (full * w_out).sum().backward()
    out = sp_net(x, t, text)
    (out * w_out).sum().backward()
    report["dit_out"] = maxdiff(out, full)
    grads = averaged_grads(sp_net)
    report["dit_grads"] = max(maxdiff(grads[n], p.grad) for n, p in net.named_parameters())

    # 2b. perf.text_padding trim / varlen under SP: no mask where no text token is padding (batch 1:
    # 3 + 32 = 35 tokens, padded to 36, so only the pad keys are masked), mixed lengths at batch 2.
    for mode in ("trim", "varlen"):
        sp_mode = copy.deepcopy(net)
        sp_mode.text_padding = mode
        apply_sequence_parallel(sp_mode)
        with torch.no_grad():
            report[f"dit_{mode}_batch1"] = maxdiff(sp_mode(x[:1], t[:1], text[:1]), net(x[:1], t[:1], text[:1]))
            report[f"dit_{mode}_batch2"] = maxdiff(sp_mode(x, t, text), net(x, t, text))

    # 3. A discriminator reading out after block 0 (gather, then re-split for block 1) and block 2.
    torch.manual_seed(2)
    D = Discriminator(copy.deepcopy(net), fractions=[0.34, 1.0], num_heads=2)
    D.zero_grad(set_to_none=True)
    sp_D = copy.deepcopy(D)
    apply_sequence_parallel(sp_D.backbone, gather_after=sp_D.layers)
    xr = x.clone().requires_grad_()
    xs = x.clone().requires_grad_()
    full = D(xr, t, text)
    (full * torch.tensor([1.0, -2.0])).sum().backward()
    out = sp_D(xs, t, text)
    (out * torch.tensor([1.0, -2.0])).sum().backward()
    report["d_layers"] = sp_D.layers
    report["d_logits"] = maxdiff(out, full)
    grads = averaged_grads(sp_D)
    report["d_grads"] = max(maxdiff(grads[n], p.grad) for n, p in D.named_parameters() if p.grad is not None)
    gx = xs.grad.clone()
    dist.all_reduce(gx)
    report["d_input_grad"] = maxdiff(gx / P, xr.grad)

    return report


if __name__ == "__main__":
    run_and_report(compare, sys.argv[1], deepspeed=True)
