"""The Wan adapter under sequence parallelism (diffusers' context-parallel hooks) equals one process.

    torchrun --nproc_per_node 2 tests/distributed_helpers/wan_ulysses.py OUT.json

Every rank builds the same tiny Wan (3 blocks, 2 heads) and inputs (fixed seeds), computes the
single-process result with a plain copy, then the sequence-parallel one with copies wired by
``apply_sequence_parallel_apt`` (G whole-output, D reading out after blocks 0 and 1, so its forward
stops before block 2), and compares: G's output and parameter gradients (averaged over ranks, as
DDP / ZeRO average them); D's logits, gradients and input gradient (summed over ranks / P); and the
G step, G's gradients through a frozen D. Rank 0 writes the largest relative differences to OUT.json.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from apt.discriminator import Discriminator  # noqa: E402
from apt.distributed.parallelize import apply_sequence_parallel_apt  # noqa: E402
from apt.distributed.sequence_parallel import sequence_parallel_mesh  # noqa: E402
from apt.models import TextCond  # noqa: E402
from apt.models.adapters import WanAdapter  # noqa: E402
from apt.models.adapters.tiny import TINY_TRANSFORMERS  # noqa: E402
from tests.distributed_helpers.gloo_report import run_and_report  # noqa: E402


def maxdiff(a, b) -> float:
    """Largest absolute difference, relative to the reference's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def grads_vs(sp_net, net) -> float:
    """Largest relative difference of ``sp_net``'s gradients (averaged over ranks) from ``net``'s."""
    worst = 0.0
    for (_, p_sp), (_, p) in zip(sp_net.named_parameters(), net.named_parameters()):
        if p.grad is None:
            continue
        g = p_sp.grad.clone() if p_sp.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        worst = max(worst, maxdiff(g / dist.get_world_size(), p.grad))
    return worst


def compare() -> dict:
    """Every comparison; the networks and attention wrappers (which hold the group) are freed on return."""
    P = dist.get_world_size()
    mesh = sequence_parallel_mesh(P, "cpu")
    report = {}

    torch.manual_seed(0)
    G = WanAdapter(diffusers.WanTransformer3DModel(**{**TINY_TRANSFORMERS["wan"], "num_layers": 3}))
    with torch.no_grad():
        for p in G.parameters():
            p.add_(0.05 * torch.randn_like(p))
    D = Discriminator(copy.deepcopy(G), fractions=[0.34, 0.67], num_heads=2)
    sp_G, sp_D = copy.deepcopy(G), copy.deepcopy(D)
    apply_sequence_parallel_apt(sp_G, sp_D, mesh)
    report["d_layers"] = sp_D.layers

    # Latents (B 2, C 4, T 2, H 8, W 8): 2 x 4 x 4 = 32 visual tokens, 16 per rank; text with padding.
    x, t = torch.randn(2, 4, 2, 8, 8), torch.rand(2)
    text = TextCond(torch.randn(2, 5, 64), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))

    # 1. G alone: output and parameter gradients.
    w = torch.randn_like(x)
    full = G(x, t, text)
    (full * w).sum().backward()
    seen = []
    handle = sp_G.model.blocks[1].register_forward_hook(lambda _m, _i, h: seen.append(h.shape[1]))
    out = sp_G(x, t, text)
    handle.remove()
    (out * w).sum().backward()
    report["tokens_per_rank"] = seen[0]
    report["g_out"] = maxdiff(out, full)
    report["g_grads"] = grads_vs(sp_G, G)

    # 2. D alone: logits, gradients, input gradient.
    xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    full = D(xr, t, text)
    (full * torch.tensor([1.0, -2.0])).sum().backward()
    out = sp_D(xs, t, text)
    (out * torch.tensor([1.0, -2.0])).sum().backward()
    report["d_logits"] = maxdiff(out, full)
    report["d_grads"] = grads_vs(sp_D, D)
    gx = xs.grad.clone()
    dist.all_reduce(gx)
    report["d_input_grad"] = maxdiff(gx / P, xr.grad)

    # 3. The G step: G's gradients through a frozen D (APT's non-saturating loss on one-step fakes).
    for net in (G, sp_G):
        net.zero_grad(set_to_none=True)
    for net in (D, sp_D):
        net.requires_grad_(False)
    T = torch.ones(2)
    for g, d in ((G, D), (sp_G, sp_D)):
        loss = torch.nn.functional.softplus(-d(x - g(x, T, text), t, text)).mean()
        loss.backward()
    report["g_step_grads"] = grads_vs(sp_G, G)

    # 4. A latent whose visual tokens do not split over the group: apt's clear error, not diffusers' assertion.
    try:
        sp_G(torch.randn(1, 4, 1, 6, 6), T[:1], text[:1])  # 1 x 3 x 3 = 9 tokens
        report["uneven_error"] = ""
    except ValueError as e:
        report["uneven_error"] = str(e)

    return report


if __name__ == "__main__":
    run_and_report(compare, sys.argv[1])
