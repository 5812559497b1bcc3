"""``apt.methods.apt.apt_step`` itself, with tiny G and D and plain optimisers (no Lightning)."""

from __future__ import annotations

import copy

import pytest
import torch

from apt.config import AptConfig
from apt.ema import ema_update
from apt.methods.apt import AptProgress, SampleNoise, apt_step, build_discriminator, one_step
from apt.methods.update import OptimizerUpdate
from apt.models import build_dit
from tests.conftest import random_text

SHAPE = (3, 4, 16, 16)  # (C, T, H, W) of the tiny flavour


def tiny_nets(seed: int = 0):
    torch.manual_seed(seed)
    G, backbone = build_dit("tiny"), build_dit("tiny")
    for net in (G, backbone):  # past adaLN-Zero's identity start, so every block passes gradient
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.05)
    a = AptConfig(readout_fractions=[0.5, 1.0], r1_sigma=0.1, r1_lambda=100.0, optimizer="adam", lr_g=1e-3, lr_d=1e-3)
    return G, build_discriminator(backbone, a), a


class Recorder:
    """A NetUpdate that records which networks hold gradient when it steps, and steps a real optimiser."""

    def __init__(self, name: str, optimizer, net, nets: dict):
        self.name, self.inner, self.nets, self.seen = name, OptimizerUpdate(optimizer, net), nets, []

    def zero_grad(self):
        for net in self.nets.values():  # a step must not rely on the other network's gradients being cleared
            net.zero_grad(set_to_none=True)
        self.inner.zero_grad()

    def backward(self, loss):
        self.inner.backward(loss)

    def step(self):
        self.seen.append({n: any(p.grad is not None for p in net.parameters()) for n, net in self.nets.items()})
        return self.inner.step()


def step(G, D, a, micro_batches, progress, *, seed=7, rank=0, world_size=1, G_ema=None, opts=None):
    opt_g, opt_d = opts or (torch.optim.SGD(G.parameters(), lr=0.0), torch.optim.SGD(D.parameters(), lr=0.0))
    G_ema = G_ema if G_ema is not None else copy.deepcopy(G)
    return apt_step(G, D, micro_batches, update_g=OptimizerUpdate(opt_g, G), update_d=OptimizerUpdate(opt_d, D),
                    update_ema=lambda decay: ema_update(G_ema, G, decay), a=a, progress=progress, step_seed=seed, rank=rank, world_size=world_size)


def test_d_step_trains_d_only_and_g_step_trains_g_only():
    G, D, a = tiny_nets()
    nets = {"G": G, "D": D}
    G0, D0 = copy.deepcopy(G.state_dict()), copy.deepcopy(D.state_dict())
    upd_g = Recorder("G", torch.optim.Adam(G.parameters(), lr=1e-3), G, nets)
    upd_d = Recorder("D", torch.optim.Adam(D.parameters(), lr=1e-3), D, nets)
    x, text = torch.randn(2, *SHAPE), random_text(2, 4, 32)
    G_ema = copy.deepcopy(G)
    apt_step(G, D, [(x, text)], update_g=upd_g, update_d=upd_d, update_ema=lambda d: ema_update(G_ema, G, d), a=a,
             progress=AptProgress(), step_seed=0)
    assert upd_d.seen == [{"G": False, "D": True}]  # fakes detached: no gradient reaches G in the D step
    assert upd_g.seen == [{"G": True, "D": False}]  # D frozen: no gradient reaches D in the G step
    assert all(p.requires_grad for p in D.parameters())  # D unfrozen again for the next D step
    assert any(not torch.equal(v, G0[k]) for k, v in G.state_dict().items())
    assert any(not torch.equal(v, D0[k]) for k, v in D.state_dict().items())


def test_warm_up_steps_d_only_then_g_and_ema():
    G, D, a = tiny_nets()
    a.d_warmup_steps = 2
    G0, G_ema = copy.deepcopy(G.state_dict()), copy.deepcopy(G)
    opts = (torch.optim.Adam(G.parameters(), lr=1e-3), torch.optim.Adam(D.parameters(), lr=1e-3))
    progress, batch = AptProgress(), [(torch.randn(2, *SHAPE), random_text(2, 4, 32))]
    for _ in range(2):
        metrics = step(G, D, a, batch, progress, G_ema=G_ema, opts=opts)
        assert "loss_g" not in metrics
    assert all(torch.equal(v, G0[k]) for k, v in G.state_dict().items()) and (progress.g_updates, progress.d_updates) == (0, 2)
    metrics = step(G, D, a, batch, progress, G_ema=G_ema, opts=opts)
    assert "loss_g" in metrics and (progress.g_updates, progress.d_updates) == (1, 3)
    # EMA <- 0.995 EMA + 0.005 G, from the initial weights
    for k, v in G_ema.state_dict().items():
        torch.testing.assert_close(v, 0.995 * G0[k] + 0.005 * G.state_dict()[k])


def test_approximate_r1_is_lambda_times_the_squared_logit_change_under_the_steps_own_noise():
    G, D, a = tiny_nets()
    a.d_warmup_steps = 10  # D step only; nothing is updated (lr 0)
    x, text = torch.randn(3, *SHAPE), random_text(3, 4, 32)
    metrics = step(G, D, a, [(x, text)], AptProgress(), seed=11)
    noise = SampleNoise(11, range(3))
    noise.randn(SHAPE, "cpu")  # the fakes' z
    t = noise.timesteps(D, "cpu")
    x_perturbed = x + a.r1_sigma * noise.randn(SHAPE, "cpu")
    with torch.no_grad():
        d_real, d_perturbed = D(x, t, text), D(x_perturbed, t, text)
    expected = a.r1_lambda * (d_real - d_perturbed).pow(2).mean()
    torch.testing.assert_close(metrics["r1"], expected, rtol=1e-4, atol=1e-7)
    assert metrics["r1"] > 0
    a.use_r1 = False
    assert step(G, D, a, [(x, text)], AptProgress(), seed=11)["r1"] == 0


def test_noise_is_per_sample_whatever_the_split():
    """The same global batch in one piece, as two micro-batches, or over two data ranks: every sample draws
    the same z, t and aR1 perturbation, so losses and gradients agree (and no two samples share noise)."""
    G, D, a = tiny_nets()
    x, text = torch.randn(4, *SHAPE), random_text(4, 4, 32)
    halves = [(x[:2], text[0:2]), (x[2:], text[2:4])]

    def d_grads(micro_batches, rank=0, world_size=1):
        D.zero_grad(set_to_none=True)
        a.d_warmup_steps = 10  # D step only; lr 0 keeps the weights
        metrics = step(G, D, a, micro_batches, AptProgress(), rank=rank, world_size=world_size)
        return metrics, [p.grad.clone() for p in D.parameters() if p.grad is not None]

    whole, g_whole = d_grads([(x, text)])
    micro, g_micro = d_grads(halves)  # accumulation: the step divides each micro-batch's loss by 2
    r0, g_r0 = d_grads([halves[0]], rank=0, world_size=2)
    r1, g_r1 = d_grads([halves[1]], rank=1, world_size=2)
    for key in ("loss_d", "d_real", "d_fake", "r1"):
        torch.testing.assert_close(micro[key], whole[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((r0[key] + r1[key]) / 2, whole[key], rtol=1e-5, atol=1e-6)  # DDP averages over ranks
    for gw, gm, g0, g1 in zip(g_whole, g_micro, g_r0, g_r1):
        torch.testing.assert_close(gm, gw, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close((g0 + g1) / 2, gw, rtol=1e-4, atol=1e-6)
    z = SampleNoise(7, range(4)).randn(SHAPE, "cpu")
    assert all(not torch.equal(z[i], z[j]) for i in range(4) for j in range(i))


def test_non_finite_loss_stops_the_step_before_any_update():
    G, D, a = tiny_nets()
    x = torch.randn(2, *SHAPE)
    x[0, 0, 0, 0, 0] = float("nan")
    D0 = copy.deepcopy(D.state_dict())
    with pytest.raises(FloatingPointError, match="D loss is not finite at generator update 0"):
        step(G, D, a, [(x, random_text(2, 4, 32))], AptProgress(), opts=(torch.optim.SGD(G.parameters(), lr=1.0), torch.optim.SGD(D.parameters(), lr=1.0)))
    assert all(torch.equal(v, D0[k]) for k, v in D.state_dict().items())


def test_one_step_is_z_minus_the_velocity_at_t_1():
    G, _, _ = tiny_nets()
    z, text = torch.randn(2, *SHAPE), random_text(2, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(one_step(G, z, text), z - G(z, torch.ones(2), text))


def test_optimizer_update_clips_the_global_norm():
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    update = OptimizerUpdate(opt, net, max_norm=0.5)
    update.zero_grad()
    update.backward((net(torch.randn(8, 4)) * 10).pow(2).sum())
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    norm = update.step()
    assert norm > 0.5  # the reported norm is the one before clipping
    moved = torch.cat([(before[n] - p.detach()).flatten() for n, p in net.named_parameters()])  # lr 1: the applied gradient
    torch.testing.assert_close(moved.norm(), torch.tensor(0.5), rtol=1e-4, atol=0)
