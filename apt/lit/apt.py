"""Stage 2: adversarial post-training (APT, arXiv 2501.08316 §3).

G: the one-step generator G(z, c) = z - G^(z, c, T), initialised from stage 1 (or the image-stage
EMA for the video stage). D: a copy of the ORIGINAL diffusion weights + multi-depth readout heads
(``apt.discriminator``), re-initialised at every stage. Non-saturating losses, approximate R1 on
real data, RMSProp (alpha 0.9), G:D 1:1, EMA of G (0.995) is the product.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn

from apt.config import Config
from apt.discriminator import Discriminator
from apt.ema import ema_update
from apt.lit.base import StageModule
from apt.losses import approximate_r1, d_loss_nonsaturating, g_loss_nonsaturating
from apt.models.backbone import TextCond


def _grad_norm(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)


class AptModule(StageModule):
    def __init__(self, config: Config):
        super().__init__(config)
        a = config.apt
        self.automatic_optimization = False
        self.generator = self.load_generator_init(a.generator)
        self.generator_ema = self.frozen_copy(self.generator)
        d_backbone = self.load_backbone(a.teacher, "net_ema")  # the ORIGINAL diffusion weights
        d_backbone.requires_grad_(a.train_d_backbone)
        self.discriminator = Discriminator(d_backbone, fractions=list(a.readout_fractions), num_heads=d_backbone.config.num_heads, timestep_shift=a.d_timestep_shift)
        self.g_updates = 0
        self.d_updates = 0
        self.win_streak = 0

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

    # -- the method ----------------------------------------------------------------------------
    def one_step(self, net, z: torch.Tensor, text: TextCond) -> torch.Tensor:
        """G(z, c) = z - G^(z, c, T) at the final timestep T = 1."""
        T = torch.ones(z.shape[0], device=z.device)
        return z - net(z, T, text)

    def training_step(self, batch, batch_idx):
        a = self.config.apt
        opt_g, opt_d = self.optimizers()
        x_real, text = batch["x"], self.encode(batch["caption"])
        B = x_real.shape[0]
        D, G = self.discriminator, self.generator

        # 1. D step(s) (APT §3.3-3.4): real vs detached one-step fakes, plus approximate R1 on real
        #    data: D(x) and D(x + sigma n) with the same t and text. One batched D forward.
        for _ in range(a.d_steps_per_g_step):
            with torch.no_grad():
                x_fake = self.one_step(G, self.randn(*x_real.shape), text)
            t = D.sample_t(B, self.rng, self.device)
            x_perturbed = x_real + a.r1_sigma * self.randn(*x_real.shape)
            logits = D(torch.cat([x_real, x_perturbed, x_fake]), t.repeat(3), text.repeat(3))
            d_real, d_perturbed, d_fake = logits.split(B)
            loss_adv = d_loss_nonsaturating(d_real, d_fake)
            r1 = approximate_r1(d_real, d_perturbed, weight=a.r1_lambda) if a.use_r1 else torch.zeros((), device=self.device)
            loss_d = loss_adv + r1
            self.check_finite("D loss", loss_d)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(loss_d)
            grad_norm_d = _grad_norm(D.parameters())
            opt_d.step()
            self.d_updates += 1

        # 2. G step (after the D-only warm-up): fresh noise and timesteps, D frozen so no gradient
        #    reaches it; non-saturating loss softplus(-D(G(z))).
        warming_up = self.d_updates <= a.d_warmup_steps * a.d_steps_per_g_step
        if not warming_up:
            D.requires_grad_(False)
            x_fake = self.one_step(G, self.randn(*x_real.shape), text)
            loss_g = g_loss_nonsaturating(D(x_fake, D.sample_t(B, self.rng, self.device), text))
            self.check_finite("G loss", loss_g)
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(loss_g)
            grad_norm_g = _grad_norm(G.parameters())
            opt_g.step()
            self.restore_d_grad()
            # 3. EMA of G (decay 0.995): the product.
            ema_update(self.generator_ema, G, a.ema_decay)
            self.g_updates += 1
            self.log_dict({"loss_g": loss_g, "grad_norm_g": grad_norm_g}, prog_bar=True)

        # 4. Training health: D(real), D(fake), aR1, gradient norms; warn when D wins outright.
        self.log_dict({"loss_d": loss_d, "d_real": d_real.mean(), "d_fake": d_fake.mean(), "r1": r1, "grad_norm_d": grad_norm_d}, prog_bar=True)
        self.log("g_updates", float(self.g_updates))
        self.watch_collapse(loss_adv.item(), d_real.mean().item(), d_fake.mean().item())

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
