"""Stage 2: adversarial post-training (APT, arXiv 2501.08316 §3).

G: the one-step generator G(z, c) = z - G^(z, c, T), initialised from stage 1 (or the image-stage
EMA for the video stage). D: a copy of the ORIGINAL diffusion weights + multi-depth readout heads
(``apt.discriminator``), re-initialised at every stage. Non-saturating losses, approximate R1 on
real data, RMSProp (alpha 0.9), G:D 1:1, EMA of G (0.995) is the product.

One iteration is ``apt_step``, shared by every way of running it: Lightning's Trainer (one device,
DDP, FSDP2) through ``training_step``, and the DeepSpeed runner (one engine per network,
``apt.distributed.deepspeed_runner``). They differ only in how a network is updated from a loss
(``NetUpdate``). Under FSDP2 and ZeRO-3 the EMA generator is sharded like G (``update_ema``).
"""

from __future__ import annotations

import contextlib
import math
from typing import ContextManager, Protocol

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from apt.config import AptConfig, Config
from apt.discriminator import Discriminator
from apt.distributed.sequence_parallel import apply_sequence_parallel_apt, data_parallel_rank, sequence_parallel_mesh
from apt.distributed.zero3_ema import PartitionedEma
from apt.ema import ema_update, local_shard
from apt.lit.base import StageModule
from apt.losses import approximate_r1, d_loss_nonsaturating, g_loss_nonsaturating, mismatch_loss, text_contrast_loss
from apt.models.backbone import TextCond


def _grad_norm(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: sharded (DTensor) gradients


class NetUpdate(Protocol):
    """How one network is updated from a loss (Lightning manual optimisation, or a DeepSpeed engine)."""

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> torch.Tensor:
        """Apply the accumulated gradient; return its global norm."""
        ...


class ManualUpdate:
    """``NetUpdate`` for Lightning's manual optimisation (single device, DDP, FSDP2)."""

    def __init__(self, module: "AptModule", optimizer, net: torch.nn.Module):
        self.module, self.optimizer, self.net = module, optimizer, net

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        self.module.manual_backward(loss)

    def step(self) -> torch.Tensor:
        grad_norm = _grad_norm(self.net.parameters())
        self.optimizer.step()
        return grad_norm


class SampleNoise:
    """The randomness of one iteration: one stream per sample, seeded by its index in the GLOBAL batch.

    A sample draws the same z, t and aR1 perturbation whether the global batch runs in one process or
    is split over ranks and micro-batches, so a ZeRO / DDP run can be compared exactly with a single
    device, and ranks never share noise. The step seed comes from the module's rng, which advances
    identically on every rank: rank 0's rng state is enough for exact resume.
    """

    def __init__(self, step_seed: int, indices: range):
        self.generators = [torch.Generator().manual_seed(step_seed + i) for i in indices]

    def randn(self, shape: torch.Size, device) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(device)

    def timesteps(self, D: Discriminator, device) -> torch.Tensor:
        return torch.cat([D.sample_t(1, g) for g in self.generators]).to(device)


def build_discriminator(backbone, a: AptConfig) -> Discriminator:
    """APT's D around a diffusion backbone: readout heads at ``apt.readout_fractions``, t-shift ``apt.d_timestep_shift``."""
    return Discriminator(backbone, fractions=list(a.readout_fractions), num_heads=backbone.config.num_heads, timestep_shift=a.d_timestep_shift)


def _mean(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.detach() for v in values]).mean()


class AptModule(StageModule):
    def __init__(self, config: Config):
        super().__init__(config)
        a = config.apt
        self.automatic_optimization = False
        self.generator = self.load_generator_init(a.generator)
        self.generator_ema = self.frozen_copy(self.generator)
        d_backbone = self.load_backbone(a.teacher, "net_ema")  # the ORIGINAL diffusion weights
        d_backbone.requires_grad_(a.train_d_backbone)
        self.discriminator = build_discriminator(d_backbone, a)
        self.g_updates = 0
        self.d_updates = 0
        self.win_streak = 0
        # A sharded EMA (set by apt.distributed): FSDP2 shards the module like G; ZeRO-3 keeps partitions.
        self.ema_sharded = False
        self.ema_partitions: PartitionedEma | None = None

    def load_generator_init(self, path: str):
        """Stage-1 student (net_ema) or an earlier APT stage's EMA generator (generator_ema)."""
        try:
            return self.load_backbone(path, "generator_ema")
        except FileNotFoundError:
            return self.load_backbone(path, "net_ema")

    # -- progress ----------------------------------------------------------------------------
    @property
    def progress_step(self) -> int:
        return self.g_updates  # trainer.global_step counts both optimisers' steps

    def trainer_max_steps(self) -> int:
        a = self.config.apt
        return a.d_warmup_steps * a.d_steps_per_g_step + self.config.train.max_steps * (a.d_steps_per_g_step + 1)

    def extra_state(self) -> dict:
        return {"g_updates": self.g_updates, "d_updates": self.d_updates, "win_streak": self.win_streak}

    def load_extra_state(self, state: dict) -> None:
        self.g_updates, self.d_updates, self.win_streak = state["g_updates"], state["d_updates"], state["win_streak"]

    def sampling_network(self):
        return self.generator_ema

    def configure_model(self) -> None:
        """FSDP2 (``train.strategy: fsdp2``) shards G and D separately; ``train.sequence_parallel`` splits
        their sequences over groups of ranks (after FSDP2, the order of ``apt.distributed.strategies``);
        a no-op on one device or plain DDP."""
        if self.device_mesh is not None:
            from apt.distributed.strategies import fully_shard_apt

            fully_shard_apt(self, self.device_mesh)
        P = self.config.train.sequence_parallel
        if P > 1:
            apply_sequence_parallel_apt(self.generator, self.discriminator, sequence_parallel_mesh(P, self.trainer.strategy.root_device.type))

    # -- the EMA generator, whole or sharded like G -----------------------------------------------
    def update_ema(self, decay: float) -> None:
        """EMA <- decay * EMA + (1 - decay) * G, on this rank's shards when sharded (no gather)."""
        if self.ema_partitions is not None:
            self.ema_partitions.update(self.generator, decay)  # ZeRO-3
        else:
            ema_update(self.generator_ema, self.generator, decay)  # whole, or FSDP2 shard by shard

    @property
    def samples_on_every_rank(self) -> bool:
        return self.ema_sharded or self.ema_partitions is not None

    def gathered_sampling_network(self) -> ContextManager[torch.nn.Module]:
        """ZeRO-3 gathers the whole EMA for the call; FSDP2's EMA gathers block by block in its forward."""
        if self.ema_partitions is not None:
            return self.ema_partitions.gathered()
        return contextlib.nullcontext(self.generator_ema)

    def ema_numel(self) -> tuple[int, int]:
        """(EMA elements on this rank, elements of the whole EMA); ZeRO-3 partitions include their padding."""
        if self.ema_partitions is not None:
            return self.ema_partitions.numel(), sum(math.prod(s) for s in self.ema_partitions.shapes)
        params = list(self.generator_ema.parameters())
        return sum(local_shard(p).numel() for p in params), sum(p.numel() for p in params)  # a DTensor's numel is global

    def log_ema_size(self) -> None:
        """Collective: one line on rank 0 with the EMA elements every rank holds (the tests read it)."""
        counts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(counts, self.ema_numel())
        whole = counts[0][1]
        rank_zero_info(f"EMA generator sharded like G: {whole} elements, per rank {[n for n, _ in counts]} "
                       f"(fractions {[round(n / whole, 4) for n, _ in counts]})")

    # -- the method ----------------------------------------------------------------------------
    def one_step(self, net, z: torch.Tensor, text: TextCond) -> torch.Tensor:
        """G(z, c) = z - G^(z, c, T) at the final timestep T = 1."""
        T = torch.ones(z.shape[0], device=z.device)
        return z - net(z, T, text)

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        rank, world_size = data_parallel_rank(self.global_rank, self.trainer.world_size, self.config.train.sequence_parallel)
        metrics = self.apt_step(
            [batch],
            update_g=ManualUpdate(self, opt_g, self.generator),
            update_d=ManualUpdate(self, opt_d, self.discriminator),
            rank=rank,  # of the data: the ranks of a sequence-parallel group share samples and noise
            world_size=world_size,
        )
        self.log_dict(metrics, prog_bar=True, sync_dist=True)  # means over ranks, as the DeepSpeed runner logs
        self.log("g_updates", float(self.g_updates))

    def apt_step(self, micro_batches: list[dict], *, update_g: NetUpdate, update_d: NetUpdate, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """One APT iteration on this rank's gradient-accumulation micro-batches; returns the metrics.

        Every D (and G) update accumulates over all micro-batches before it steps, so G and D updates
        stay separate under accumulation; the strategy averages the gradients over ranks.
        """
        a = self.config.apt
        D, G = self.discriminator, self.generator
        k = len(micro_batches)
        # 0. Per micro-batch: real clips, text, and one noise stream per sample of the GLOBAL batch
        #    (micro-batch j of rank r holds global samples (j * world + r) * B, ...).
        step_seed = int(torch.randint(0, 2**62, (1,), generator=self.rng))
        parts = []
        for j, batch in enumerate(micro_batches):
            B = batch["x"].shape[0]
            first = (j * world_size + rank) * B
            parts.append((batch["x"], self.encode_batch(batch), SampleNoise(step_seed, range(first, first + B))))
        metrics: dict[str, torch.Tensor] = {}

        # 1. D step(s) (APT §3.3-3.4): real vs detached one-step fakes, plus approximate R1 on real
        #    data: D(x) and D(x + sigma n) with the same t and text. One batched D forward.
        for _ in range(a.d_steps_per_g_step):
            update_d.zero_grad()
            stats: dict[str, list[torch.Tensor]] = {"loss_d": [], "loss_adv": [], "d_real": [], "d_fake": [], "r1": []}
            for x_real, text, noise in parts:
                B = x_real.shape[0]
                with torch.no_grad():
                    x_fake = self.one_step(G, noise.randn(x_real.shape[1:], self.device), text)
                t = noise.timesteps(D, self.device)
                x_perturbed = x_real + a.r1_sigma * noise.randn(x_real.shape[1:], self.device)
                x_in, texts = [x_real, x_perturbed, x_fake], [text, text, text]
                if a.mismatch_weight > 0:  # not in the paper: real clips under the nearest other text
                    x_in, texts = x_in + [x_real], texts + [text.nearest_other()]
                logits = D(torch.cat(x_in), t.repeat(len(x_in)), TextCond.cat(texts))
                d_real, d_perturbed, d_fake, *d_mismatched = logits.split(B)
                loss_adv = d_loss_nonsaturating(d_real, d_fake)
                if d_mismatched:
                    loss_adv = loss_adv + a.mismatch_weight * mismatch_loss(d_mismatched[0])
                r1 = approximate_r1(d_real, d_perturbed, weight=a.r1_lambda) if a.use_r1 else torch.zeros((), device=self.device)
                loss_d = loss_adv + r1
                self.check_finite("D loss", loss_d)
                update_d.backward(loss_d / k)
                for key, value in zip(stats, (loss_d, loss_adv, d_real.mean(), d_fake.mean(), r1)):
                    stats[key].append(value)
            grad_norm_d = update_d.step()
            self.d_updates += 1

        # 2. G step (after the D-only warm-up): fresh noise and timesteps, D frozen so no gradient
        #    reaches it; non-saturating loss softplus(-D(G(z))).
        warming_up = self.d_updates <= a.d_warmup_steps * a.d_steps_per_g_step
        if not warming_up:
            D.requires_grad_(False)
            update_g.zero_grad()
            losses_g = []
            for x_real, text, noise in parts:
                x_fake = self.one_step(G, noise.randn(x_real.shape[1:], self.device), text)
                t = noise.timesteps(D, self.device)
                if a.text_contrast_weight > 0:  # not in the paper: look like c to D rather than like c'
                    d_fake, d_other = D(torch.cat([x_fake, x_fake]), t.repeat(2), TextCond.cat([text, text.nearest_other()])).split(x_fake.shape[0])
                    loss_g = g_loss_nonsaturating(d_fake) + a.text_contrast_weight * text_contrast_loss(d_fake, d_other)
                else:
                    loss_g = g_loss_nonsaturating(D(x_fake, t, text))
                self.check_finite("G loss", loss_g)
                update_g.backward(loss_g / k)
                losses_g.append(loss_g)
            grad_norm_g = update_g.step()
            self.restore_d_grad()
            # 3. EMA of G (decay 0.995): the product.
            self.update_ema(a.ema_decay)
            self.g_updates += 1
            metrics.update(loss_g=_mean(losses_g), grad_norm_g=grad_norm_g)

        # 4. Training health: D(real), D(fake), aR1, gradient norms; warn when D wins outright.
        d = {key: _mean(values) for key, values in stats.items()}
        metrics.update(loss_d=d["loss_d"], d_real=d["d_real"], d_fake=d["d_fake"], r1=d["r1"], grad_norm_d=grad_norm_d)
        self.watch_collapse(d["loss_adv"].item(), d["d_real"].item(), d["d_fake"].item())
        return metrics

    def restore_d_grad(self) -> None:
        a = self.config.apt
        self.discriminator.requires_grad_(True)
        self.discriminator.backbone.requires_grad_(a.train_d_backbone)

    def watch_collapse(self, loss_adv: float, d_real: float, d_fake: float) -> None:
        """The collapse APT reports without aR1: D separates perfectly and G stops learning."""
        wins = loss_adv < 0.05 and d_real > 0 > d_fake
        self.win_streak = self.win_streak + 1 if wins else 0
        if self.win_streak == self.config.apt.collapse_patience:
            rank_zero_warn(
                f"D has won outright for {self.win_streak} steps (D loss {loss_adv:.3g}, D(real) {d_real:.2f}, "
                f"D(fake) {d_fake:.2f}): training is collapsing. Check apt.use_r1 / r1_lambda / r1_sigma and the learning rates."
            )

    def configure_optimizers(self):
        a = self.config.apt
        d_params = [p for p in self.discriminator.parameters() if p.requires_grad]

        def make(params, lr):
            if a.optimizer == "rmsprop":
                return torch.optim.RMSprop(params, lr=lr, alpha=a.rmsprop_alpha, weight_decay=0.0)
            return torch.optim.Adam(params, lr=lr, betas=tuple(a.adam_betas), weight_decay=0.0)

        return make(self.generator.parameters(), a.lr_g), make(d_params, a.lr_d)
