"""Speed switches (``PerfConfig``), applied to a backbone in one place and one fixed order.

``apply_perf(model, perf)`` applies, in this order:

1. ``fp8`` (+ ``fp8_scaling``, ``fp8_fast_accum``): swap the blocks' linear layers to
   ``FP8Linear`` (``apt.perf.fp8``), before compile so the compiled graph traces the FP8 matmuls;
2. ``fused_qk_norm_rope``: switch every attention layer to ``apt.models.layers.rms_norm_rope``,
   before compile so it is fused into the block's kernels; ``text_padding``: how the DiT hands
   padded text to attention (``apt.models.attention.text_key_layout``);
3. ``attention_backend``: scope the kernel choice (``apt.models.attention``) to this model's
   forward (forward pre-hook + always-called forward hook, so nested models and errors restore it);
   an optional kernel (fa3, fa3_fp8, sage) on a CUDA model is checked here (extra installed, GPU);
4. ``compile``: ``torch.compile`` every block in place (``nn.Module.compile``: parameter names and
   checkpoints unchanged; the Python code around the blocks stays eager);
5. ``cuda_graphs``: wrap the whole forward in ``CUDAGraphForward`` (last: it records whatever the
   steps above made). Needs the model on CUDA; elsewhere it is skipped with a warning.

The ``vae_*`` switches are not model settings: ``apt.perf.vae.apply_vae_perf`` applies them to a VAE
and the decode path reads ``vae_chunk_frames`` (``apt.perf.vae.decode_latents``).
Each switch has an equivalence test against the plain path in tests/test_perf.py.
"""

from __future__ import annotations

import warnings

from torch import nn

from apt.config import PerfConfig
from apt.models.attention import (
    KERNEL_BACKENDS,
    attention_backend,
    get_attention_backend,
    set_attention_backend,
)

__all__ = ["PerfConfig", "apply_perf", "attention_backend", "perf_from_overrides"]


def _scope_attention_backend(model: nn.Module, name: str) -> None:
    saved: list[str] = []

    def enter(_module, _args):
        saved.append(get_attention_backend())
        set_attention_backend(name)

    def leave(_module, _args, _output):
        set_attention_backend(saved.pop())

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)


def apply_perf(model: nn.Module, perf: PerfConfig) -> nn.Module:
    """Apply ``perf`` to ``model`` (in place, in the documented order); returns the model to call.

    The return value is ``model`` itself unless ``cuda_graphs`` wraps it. Call it once per model,
    after moving the model to its device and dtype.
    """
    from apt.config import check_perf

    check_perf(perf)
    if getattr(model, "_apt_perf", None) is not None:
        raise ValueError("apply_perf was already applied to this model")
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"apply_perf needs a backbone with a .blocks list, got {type(model).__name__}")
    device = next(model.parameters()).device

    # 1. FP8 matmuls (before compile).
    if perf.fp8:
        from apt.perf.fp8 import convert_to_fp8

        if convert_to_fp8(model, scaling=perf.fp8_scaling, fast_accum=perf.fp8_fast_accum) == 0:
            warnings.warn("perf.fp8: no linear layer inside the blocks to convert", stacklevel=2)

    # 2. Fused QK-norm + RoPE (before compile).
    if perf.fused_qk_norm_rope:
        switched = [m for m in model.modules() if hasattr(m, "fused_qk_norm_rope")]
        for m in switched:
            m.fused_qk_norm_rope = True
        if not switched:
            warnings.warn(f"perf.fused_qk_norm_rope ignored: {type(model).__name__} has no built-in DiT attention layers", stacklevel=2)

    if perf.text_padding != "mask":
        padded = [m for m in model.modules() if hasattr(m, "text_padding")]
        for m in padded:
            m.text_padding = perf.text_padding
        if not padded:
            warnings.warn(f"perf.text_padding ignored: {type(model).__name__} is not the built-in DiT", stacklevel=2)

    # 3. Attention backend, scoped to this model's forward.
    if perf.attention_backend in KERNEL_BACKENDS and device.type != "cuda":
        warnings.warn(f"perf.attention_backend={perf.attention_backend}: no such kernel on {device}; emulating its numerics (slower)", stacklevel=2)
    if perf.attention_backend in KERNEL_BACKENDS and device.type == "cuda":
        from apt.models.attention_kernels import check_kernel

        config = getattr(model, "config", None)
        head_dim = config.hidden_dim // config.num_heads if hasattr(config, "num_heads") else 128
        check_kernel(perf.attention_backend, device, next(model.parameters()).dtype, head_dim)
    if perf.attention_backend != "auto":
        _scope_attention_backend(model, perf.attention_backend)

    # 4. torch.compile per block.
    if perf.compile:
        for block in blocks:
            block.compile(backend=perf.compile_backend)

    model._apt_perf = perf
    # 5. CUDA graph of the whole forward (last).
    if perf.cuda_graphs:
        if device.type != "cuda":
            warnings.warn(f"perf.cuda_graphs ignored: the model is on {device}, CUDA graphs need a CUDA device", stacklevel=2)
        else:
            from apt.perf.cuda_graph import CUDAGraphForward

            return CUDAGraphForward(model)
    return model


def perf_from_overrides(overrides: list[str]) -> PerfConfig:
    """A ``PerfConfig`` from ``key=value`` strings (benchmark CLIs: ``compile=true``), as strict as
    the recipe config (unknown keys fail with "did you mean 'perf.compile'?")."""
    from omegaconf import OmegaConf

    from apt.config import Config, ConfigError, _merge

    cfg = OmegaConf.structured(Config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"perf override '{item}' must look like key=value")
        key = item if item.startswith("perf.") else f"perf.{item}"
        cfg = _merge(cfg, OmegaConf.from_dotlist([key]), f"perf override '{item}'")
    return OmegaConf.to_object(cfg.perf)

