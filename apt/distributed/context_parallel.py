"""Ulysses sequence parallelism for diffusers adapters, through diffusers' own context-parallel hooks.

diffusers (0.42 here) ships context parallelism for transformers that declare a ``_cp_plan``. Wan's
plan splits the visual ``hidden_states`` entering ``blocks.0`` and the RoPE tables along the
sequence, and gathers at ``proj_out``; self-attention goes through diffusers' Ulysses all-to-all
(``TemplatedUlyssesAttention``; the native SDPA backend has a backward), cross-attention stays local
(its K/V, the text, are whole on every rank). apt uses the plan's splits and that attention as they
are, with two changes for training:

- Gathers sum gradients. diffusers' gather at ``proj_out`` gives each rank back only its own chunk's
  gradient, so when every rank computes the same loss, averaging parameter gradients over the group
  (DDP / ZeRO do) would give 1/P of the single-device gradient. apt gathers with ``gather_sequence``
  instead, whose backward sums the ranks' gradients for each chunk, as for the built-in DiT.
- Readout taps read whole layers: the adapter's ``visual_tokens`` (what the discriminator's heads
  read, ``apt.models.backbone.tap_hidden_states``) gathers the local chunk; the blocks keep running
  on chunks.

``ModelMixin.enable_parallelism`` is not called: it looks up the device as
``rank % torch.accelerator.device_count()``, a ZeroDivisionError without an accelerator (measured on
CPU), and builds a mesh over the whole world. Its three context-parallel steps are done here with
apt's mesh (``sequence_parallel_mesh``): set up the config, hand it to the attention processors,
register the plan's hooks. The visual token count must divide P (diffusers' ``EquipartitionSharder``
asserts it): apt checks it first and names the numbers; heads must divide P.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from apt.distributed.sequence_parallel import check_sequence_parallel, gather_sequence
from apt.models.adapters.base import DiffusersAdapter


def apply_context_parallel(adapter: DiffusersAdapter, mesh: DeviceMesh) -> None:
    """Run a diffusers adapter sequence-parallel over the mesh's ``ulysses`` groups (see above)."""
    from diffusers import ContextParallelConfig
    from diffusers.hooks.context_parallel import apply_context_parallel as register_plan_hooks
    from diffusers.models._modeling_parallel import ContextParallelOutput, ParallelConfig

    model, P = adapter.model, mesh["ulysses"].size()
    check_sequence_parallel(adapter.config.num_heads, P)
    if P == 1:
        return
    plan = getattr(model, "_cp_plan", None)
    if not plan:
        raise ValueError(f"{type(model).__name__} declares no context-parallel plan (_cp_plan) in this diffusers version")
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=P, mesh=mesh))
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device(mesh.device_type), mesh=mesh)
    model._parallel_config = config  # as enable_parallelism records it (a second call then refuses)
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    splits = {name: entry for name, entry in plan.items() if isinstance(entry, dict)}
    register_plan_hooks(model, config.context_parallel_config, splits)
    model.register_forward_pre_hook(_check_token_count(model.config.patch_size, P), with_kwargs=True)
    group = mesh["ulysses"].get_group()
    for name, entry in plan.items():
        if isinstance(entry, dict):
            continue
        if not (isinstance(entry, ContextParallelOutput) and entry.gather_dim == 1):
            raise NotImplementedError(f"{type(model).__name__}._cp_plan['{name}'] = {entry}: apt gathers one tensor along dim 1")
        model.get_submodule(name).register_forward_hook(lambda _module, _inputs, out: gather_sequence(out, group))
    local_visual_tokens = adapter.visual_tokens
    adapter.visual_tokens = lambda block_output: gather_sequence(local_visual_tokens(block_output), group)


def latent_token_count(frames_height_width: tuple[int, int, int], patch_size: tuple[int, int, int]) -> int:
    """Visual tokens of a (frames, height, width) latent for a (t, h, w) patch, as diffusers patchifies it
    (plain floor division; the built-in DiT's own count, which repeats a 1-frame image to fill a temporal
    patch, is ``apt.models.flops.visual_tokens``)."""
    (f, h, w), (pt, ph, pw) = frames_height_width, patch_size
    return (f // pt) * (h // ph) * (w // pw)


def _check_token_count(patch_size: tuple[int, int, int], P: int):
    """Pre-hook: the visual tokens of the input latent must split evenly over P ranks (diffusers' split
    does not pad), checked before diffusers' own assertion so that the error says what to change."""

    def check(_model, args, kwargs):
        latent = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        (f, h, w), (pt, ph, pw) = latent.shape[2:], patch_size
        tokens = latent_token_count((f, h, w), patch_size)
        if tokens % P:
            raise ValueError(
                f"train.sequence_parallel={P}: a latent of {f}x{h}x{w} (frames x height x width) is {tokens} visual tokens "
                f"for patch {pt}x{ph}x{pw}, which do not split over {P} ranks; choose a resolution/frame count whose "
                f"token count divides {P}, or another sequence-parallel size"
            )

    return check
