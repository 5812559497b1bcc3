"""LoRA generators (``lora.rank > 0``): the frozen base network plus low-rank adapters, in one module.

LoRA (Hu et al. 2021, arXiv 2106.09685) adds ``(alpha / r) B A x`` to chosen linear layers, B zero at
init, so the adapted network starts equal to its base. apt injects the adapters with ``peft`` into the
backbone itself (built-in DiT, diffusers adapter or in-house network), twice on the same layers:

- ``"default"``: the trained adapters, the only trainable parameters of the network;
- ``"ema"``: their exponential moving average, the product (APT §3.5's EMA generator, here of the
  adapters: base + EMA(A), EMA(B)), frozen and updated after every generator step.

So the base weights are held once: in distillation the frozen teacher is the same module with its
adapters switched off (``WithoutAdapters``), and sampling switches the EMA adapters on (``ema_adapters``);
there is no second or third copy of the backbone. FSDP2 shards the adapters with their layers, so the EMA
is sharded exactly like what it averages. The discriminator stays a fully trained copy (APT §3.3).

Checkpoints keep the adapter tensors only (``is_adapter_key``; the base comes back from ``lora.base``).
A LoRA run's ``net.safetensors`` / ``generator.safetensors`` thus holds both adapters;
``adapter_state`` turns either into peft's format (keys ``<module>.lora_A.weight``), which diffusers'
``load_lora_adapter`` reads (``apt.export_lora``).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from apt.config import Config, ConfigError, LoraConfig, config_from_yaml
from apt.ema import local_shard

TRAINED, EMA = "default", "ema"
DEFAULT_TARGETS = {"builtin": ["qkv", "proj"], "diffusers": ["to_q", "to_k", "to_v", "to_out.0"]}
PRODUCTS = {"distill": "net_ema", "apt": "generator_ema"}  # each LoRA stage's product (apt.inference.PRODUCT)
BASE_NAMES = ("generator_ema", "net_ema")  # the product of a full run the base may be (APT's, then distillation's)


def target_modules(c: LoraConfig, source: str) -> list[str]:
    """``lora.target_modules``, or the attention projections of the source's networks when empty."""
    if c.target_modules:
        return list(c.target_modules)
    if source not in DEFAULT_TARGETS:
        raise ConfigError(f"lora.target_modules must name the linear layers to adapt (model.source={source} has no default)")
    return DEFAULT_TARGETS[source]


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError("lora.rank > 0 needs the peft package: pip install 'apt-toolkit[lora]' (or pip install peft)") from None


def peft_config(c: LoraConfig, source: str):
    require_peft()
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=c.rank, lora_alpha=c.alpha or c.rank, target_modules=target_modules(c, source), lora_dropout=0.0, bias="none")


def tuner_layers(net: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in net.modules() if isinstance(m, BaseTunerLayer)]


def add_adapters(net: nn.Module, c: LoraConfig, source: str, *, adapters: tuple[str, ...] = (TRAINED, EMA)) -> nn.Module:
    """Freeze ``net`` and inject the adapters (in place): ``TRAINED`` trainable, ``EMA`` a frozen copy of it."""
    config = peft_config(c, source)
    from peft.functional import inject_adapter_in_model, set_adapter

    net.requires_grad_(False)
    for name in adapters:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            try:
                inject_adapter_in_model(config, net, adapter_name=name)
            except ValueError as e:
                raise ConfigError(f"lora.target_modules {target_modules(c, source)}: {str(e).splitlines()[0]}") from None
    if EMA in adapters:
        copy_adapter(net, TRAINED, EMA)  # the EMA starts synced (as apt.ema's copies do)
    set_adapter(net, adapters[0])  # TRAINED active and trainable, EMA frozen
    return net


def _adapter_params(net: nn.Module, adapter: str) -> list[nn.Parameter]:
    """One adapter's parameters, layer by layer in module order (lora_A, lora_B, ...)."""
    out = []
    for layer in tuner_layers(net):
        for attr in layer.adapter_layer_names:
            holder = getattr(layer, attr)
            if adapter in holder:
                item = holder[adapter]
                out.extend(item.parameters() if isinstance(item, nn.Module) else [item])
    return out


def adapter_parameters(net: nn.Module, adapter: str = TRAINED) -> list[nn.Parameter]:
    return _adapter_params(net, adapter)


@torch.no_grad()
def copy_adapter(net: nn.Module, src: str, dst: str) -> None:
    for d, s in zip(_adapter_params(net, dst), _adapter_params(net, src), strict=True):
        local_shard(d).copy_(local_shard(s))


@torch.no_grad()
def ema_update_adapters(net: nn.Module, decay: float) -> None:
    """EMA adapters <- decay * EMA + (1 - decay) * trained adapters; this rank's shards when sharded (no gather)."""
    ema = [local_shard(p) for p in _adapter_params(net, EMA)]
    trained = [local_shard(p).detach().to(ema[0].dtype) for p in _adapter_params(net, TRAINED)]
    if len(ema) != len(trained) or not ema:
        raise ValueError(f"EMA and trained adapters differ ({len(ema)} vs {len(trained)} tensors)")
    torch._foreach_lerp_(ema, trained, 1.0 - decay)


@contextlib.contextmanager
def adapters_off(net: nn.Module) -> Iterator[nn.Module]:
    """The base network for the duration: every adapter layer passes its base layer's output through."""
    layers = tuner_layers(net)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield net
    finally:
        for layer in layers:
            layer.enable_adapters(True)  # re-activates TRAINED (trainable), EMA stays frozen


class WithoutAdapters:
    """The frozen teacher of a LoRA distillation: the student's own module with its adapters off.

    A plain callable, not an nn.Module, so the shared base is neither registered twice nor saved."""

    def __init__(self, net: nn.Module):
        self.net = net

    def __call__(self, *args, **kwargs):
        with adapters_off(self.net):
            return self.net(*args, **kwargs)


@contextlib.contextmanager
def ema_adapters(net: nn.Module) -> Iterator[nn.Module]:
    """The EMA network (base + EMA adapters) in eval mode for the duration, then back to training ``TRAINED``."""
    from peft.functional import set_adapter

    was_training = net.training
    set_adapter(net, EMA, inference_mode=True)
    net.eval()
    try:
        yield net
    finally:
        set_adapter(net, TRAINED)
        net.train(was_training)


def is_adapter_key(key: str) -> bool:
    """A state-dict key of an adapter tensor (peft names them lora_A, lora_B, lora_embedding_*, lora_magnitude_*)."""
    return ".lora_" in key


def adapter_state(state_dict: dict[str, torch.Tensor], adapter: str) -> dict[str, torch.Tensor]:
    """One adapter's tensors of a LoRA network's state dict, in peft's format (``<module>.lora_A.weight``)."""
    pattern = re.compile(rf"\.(lora_[A-Za-z_]+)\.{re.escape(adapter)}(\.|$)")
    out = {}
    for k, v in state_dict.items():
        new, n = pattern.subn(r".\1\2", k)
        if n:
            out[new] = v
    return out


def load_adapter(net: nn.Module, peft_state: dict[str, torch.Tensor], adapter: str, *, source: str) -> None:
    """Load peft-format adapter tensors into ``adapter`` of ``net``; every adapter tensor must be given."""
    from peft.functional import set_peft_model_state_dict

    expected = adapter_state(net.state_dict(), adapter)
    missing, unexpected = sorted(set(expected) - set(peft_state)), sorted(set(peft_state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"LoRA weights {source} do not fit the adapters: {len(missing)} missing (first {missing[:1]}), "
                         f"{len(unexpected)} unexpected (first {unexpected[:1]}); check lora.rank / lora.target_modules")
    for k, v in peft_state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"LoRA weights {source}: {k} is {tuple(v.shape)}, the adapter's is {tuple(expected[k].shape)} (lora.rank?)")
    set_peft_model_state_dict(net, peft_state, adapter_name=adapter)


def merge(net: nn.Module, adapter: str = TRAINED) -> nn.Module:
    """Fold ``adapter`` into the base weights and drop every adapter layer (in place): a plain network, as built."""
    layers = {id(m) for m in tuner_layers(net)}
    for name, module in list(net.named_modules()):
        if id(module) in layers:
            module.merge(adapter_names=[adapter])
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name) if parent_name else net, child, module.get_base_layer())
    if hasattr(net, "peft_config"):
        del net.peft_config
    return net


# -- LoRA runs on disk -------------------------------------------------------------------------------
def run_config(path: str | Path) -> Config | None:
    """The config of the checkpoint at ``path`` (a checkpoint dir, or a run dir's latest) when it is a LoRA run, else None."""
    from apt.checkpoint import latest_checkpoint

    p = Path(path)
    if not p.is_dir():
        return None
    ckpt = p if (p / "config.yaml").exists() and any(p.glob("*.safetensors")) else latest_checkpoint(p)  # as apt.inference.resolve_checkpoint
    if ckpt is None or not (ckpt / "config.yaml").exists():
        return None
    from omegaconf import OmegaConf

    # Only a LoRA run's config is parsed: a full checkpoint loads as before, whatever keys its config.yaml holds.
    if not OmegaConf.select(OmegaConf.load(ckpt / "config.yaml"), "lora.rank", default=0):
        return None
    return config_from_yaml(ckpt / "config.yaml")


def product_file(name: str) -> tuple[str, str]:
    """Where a LoRA run keeps network ``name``: (weights file stem, adapter) -- ``generator_ema`` is the EMA
    adapter of ``generator.safetensors``, ``net`` the trained adapter of ``net.safetensors``."""
    return (name.removesuffix("_ema"), EMA) if name.endswith("_ema") else (name, TRAINED)


def resolve_base(config: Config) -> str:
    """The full weights a LoRA stage's adapters sit on (see ``LoraConfig.base``); a recipe's own value must agree."""
    if config.stage == "distill":
        base = config.distill.teacher
    else:
        init = run_config(config.apt.generator)
        base = init.lora.base if init is not None else config.apt.generator
    if config.lora.base and Path(config.lora.base).resolve() != Path(base).resolve():
        raise ConfigError(f"lora.base={config.lora.base}, but this {config.stage} stage's adapters sit on {base}; leave lora.base empty")
    return base


def check_continues(init: Config, config: Config, path: str) -> None:
    """An APT LoRA run continues the adapters of a LoRA init run: same rank, alpha and layers."""
    a, b = init.lora, config.lora
    ta, tb = target_modules(a, init.model.source), target_modules(b, config.model.source)
    if (a.rank, a.alpha or a.rank, ta) != (b.rank, b.alpha or b.rank, tb):
        raise ConfigError(f"apt.generator {path} is a LoRA run (rank {a.rank}, alpha {a.alpha or a.rank}, target_modules {ta}) and this run "
                          f"continues its adapters: set the same lora.rank / lora.alpha / lora.target_modules (this run: {b.rank}, {b.alpha or b.rank}, {tb})")
