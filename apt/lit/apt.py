"""Stage 2 under Lightning's Trainer (one device, DDP, FSDP2): holds G, its EMA (the product) and D,
their optimisers and the step's progress; one iteration is ``apt.methods.apt.apt_step``.

The DeepSpeed runner (``apt.distributed.deepspeed_runner``) uses this module as its holder too and
calls the same ``run_step``; the runners differ only in how a network is updated from a loss
(``NetUpdate``). Under FSDP2 and ZeRO-3 the EMA generator is sharded like G (``update_ema``).

With ``lora.rank > 0`` G is a full network's frozen weights plus trained adapters and the EMA generator
is its EMA adapters, held in G itself (``apt.lora``; ``generator_ema`` is None); D is unchanged, a fully
trained copy of the original weights (APT §3.3).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, fields
from typing import ContextManager

import torch
from lightning.pytorch.utilities import rank_zero_info

from apt import lora
from apt.checkpoint import load_weights
from apt.config import Config
from apt.distributed.sequence_parallel import data_parallel_rank
from apt.distributed.zero3_ema import PartitionedEma
from apt.ema import ema_update, local_shard
from apt.lit.base import StageModule
from apt.methods.apt import AptProgress, ExtraGLoss, apt_step, build_discriminator, make_optimizer, one_step
from apt.methods.update import NetUpdate, OptimizerUpdate


class AptModule(StageModule):
    def __init__(self, config: Config):
        super().__init__(config)
        a = config.apt
        self.automatic_optimization = False
        if config.lora.rank:
            self.generator = self.lora_generator(a.generator)
            self.generator_ema = None  # the EMA adapters live in the generator
        else:
            self.generator = self.load_generator_init(a.generator)
            self.generator_ema = self.frozen_copy(self.generator)
        d_backbone = self.load_backbone(a.teacher, "net_ema")  # the ORIGINAL diffusion weights
        d_backbone.requires_grad_(a.train_d_backbone)
        self.discriminator = self.build_discriminator(d_backbone)
        self.progress = AptProgress()
        # A sharded EMA (set by apt.distributed.parallelize): FSDP2 shards the module like G; ZeRO-3 keeps partitions.
        self.ema_sharded = False
        self.ema_partitions: PartitionedEma | None = None

    make_fakes = staticmethod(one_step)
    """How G makes fakes in ``apt_step`` (the streaming stage rolls out chunk by chunk)."""
    extra: ExtraGLoss | None = None
    """A term added to G's loss (the streaming stage's distribution matching)."""

    def build_discriminator(self, backbone):
        return build_discriminator(backbone, self.config.apt)

    def load_generator_init(self, path: str):
        """Stage-1 student (net_ema) or an earlier APT stage's EMA generator (generator_ema)."""
        try:
            return self.load_backbone(path, "generator_ema")
        except FileNotFoundError:
            return self.load_backbone(path, "net_ema")

    def lora_generator(self, path: str):
        """Base weights + adapters. The base is ``path``'s full product, or, when ``path`` is a LoRA run, that run's
        base, and its EMA adapters initialise both of ours (the adapters continue from stage to stage)."""
        from apt.models import factory

        init = lora.run_config(path)
        if init is not None:
            lora.check_continues(init, self.config, path)
        base = lora.resolve_base(self.config)
        G = self.add_lora(factory.load_full_weights(self.config, base, text_dim=self.text_encoder.dim), "generator")
        if init is not None:
            stem, adapter = lora.product_file(lora.PRODUCTS[init.stage])
            state = lora.adapter_state(load_weights(path, stem), adapter)
            for name in (lora.TRAINED, lora.EMA):
                lora.load_adapter(G, state, name, source=f"{stem}.safetensors ({adapter}) in {path}")
        return G

    # -- progress ----------------------------------------------------------------------------
    @property
    def g_updates(self) -> int:
        return self.progress.g_updates

    @property
    def progress_step(self) -> int:
        return self.progress.g_updates  # trainer.global_step counts both optimisers' steps

    def trainer_max_steps(self) -> int:
        a = self.config.apt
        return a.d_warmup_steps * a.d_steps_per_g_step + self.config.train.max_steps * (a.d_steps_per_g_step + 1)

    def extra_state(self) -> dict:
        return asdict(self.progress)

    def load_extra_state(self, state: dict) -> None:
        self.progress = AptProgress(**{f.name: state[f.name] for f in fields(AptProgress)})

    def sampling_network(self):
        return self.generator_ema

    def configure_model(self) -> None:
        """FSDP2 (``train.strategy: fsdp2``) and ``train.sequence_parallel``, in the order of
        ``apt.distributed.parallelize``; a no-op on one device or plain DDP."""
        P = self.config.train.sequence_parallel
        if self.device_mesh is not None or P > 1:
            from apt.distributed.parallelize import parallelize_apt

            parallelize_apt(self, sequence_parallel=P, fsdp_mesh=self.device_mesh, device_type=self.trainer.strategy.root_device.type)

    # -- the EMA generator, whole or sharded like G -----------------------------------------------
    def update_ema(self, decay: float) -> None:
        """EMA <- decay * EMA + (1 - decay) * G, on this rank's shards when sharded (no gather)."""
        if self.ema_partitions is not None:
            self.ema_partitions.update(self.generator, decay)  # ZeRO-3
        elif self.generator_ema is None:
            lora.ema_update_adapters(self.generator, decay)  # the EMA adapters, shard by shard under FSDP2
        else:
            ema_update(self.generator_ema, self.generator, decay)  # whole, or FSDP2 shard by shard

    @property
    def samples_on_every_rank(self) -> bool:
        return self.ema_sharded or self.ema_partitions is not None

    def gathered_sampling_network(self) -> ContextManager[torch.nn.Module]:
        """ZeRO-3 gathers the whole EMA for the call; FSDP2's EMA gathers block by block in its forward."""
        if self.ema_partitions is not None:
            return self.ema_partitions.gathered()
        if self.generator_ema is None:
            return lora.ema_adapters(self.generator)
        return contextlib.nullcontext(self.generator_ema)

    def ema_numel(self) -> tuple[int, int]:
        """(EMA elements on this rank, elements of the whole EMA); ZeRO-3 partitions include their padding."""
        if self.ema_partitions is not None:
            return self.ema_partitions.numel(), sum(math.prod(s) for s in self.ema_partitions.shapes)
        params = list(self.generator_ema.parameters()) if self.generator_ema is not None else lora.adapter_parameters(self.generator, lora.EMA)
        return sum(local_shard(p).numel() for p in params), sum(p.numel() for p in params)  # a DTensor's numel is global

    def log_ema_size(self) -> None:
        """Collective: one line on rank 0 with the EMA elements every rank holds (the tests read it)."""
        counts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(counts, self.ema_numel())
        whole = counts[0][1]
        rank_zero_info(f"EMA generator sharded like G: {whole} elements, per rank {[n for n, _ in counts]} "
                       f"(fractions {[round(n / whole, 4) for n, _ in counts]})")

    # -- the step ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()[:2]
        rank, world_size = data_parallel_rank(self.global_rank, self.trainer.world_size, self.config.train.sequence_parallel)
        micro_batches = batch if isinstance(batch, list) else [batch]  # train.accumulate_grad_batches groups them
        clip = self.config.optim.grad_clip
        metrics = self.run_step(
            micro_batches,
            update_g=OptimizerUpdate(opt_g, self.generator, self.manual_backward, max_norm=clip),
            update_d=OptimizerUpdate(opt_d, self.discriminator, self.manual_backward, max_norm=clip),
            rank=rank,  # of the data: the ranks of a sequence-parallel group share samples and noise
            world_size=world_size,
        )
        self.log_dict(metrics, prog_bar=True, sync_dist=True)  # means over ranks, as the DeepSpeed runner logs
        self.log("g_updates", float(self.g_updates))

    def run_step(self, micro_batches: list[dict], *, update_g: NetUpdate, update_d: NetUpdate, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """``apt_step`` on this rank's micro-batches (their text encoded), with a step seed from the run's rng."""
        step_seed = int(torch.randint(0, 2**62, (1,), generator=self.rng))
        return apt_step(
            self.generator, self.discriminator, [(b["x"], self.encode_batch(b)) for b in micro_batches],
            update_g=update_g, update_d=update_d, update_ema=self.update_ema, a=self.config.apt,
            progress=self.progress, step_seed=step_seed, rank=rank, world_size=world_size, generate=self.make_fakes,
            extra=self.extra,
        )

    def configure_optimizers(self):
        a = self.config.apt
        d_params = [p for p in self.discriminator.parameters() if p.requires_grad]
        return make_optimizer(self.trainable_parameters(self.generator), a.lr_g, a), make_optimizer(d_params, a.lr_d, a)
