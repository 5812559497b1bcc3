"""Data: the procedural toy world (embedded default dataset), WebDataset shards and loaders."""

from apt.data.shards import (
    eval_loader,
    pixels_to_tensor,
    resolve_shards,
    tensor_to_pixels,
    train_loader,
    write_toy_shards,
)
from apt.data.toy import (
    TOY_WORDS,
    ToyAttributes,
    caption,
    eval_prompts,
    make_sample,
    parse_caption,
    render_clip,
    sample_attributes,
)

__all__ = [
    "TOY_WORDS",
    "ToyAttributes",
    "caption",
    "eval_loader",
    "eval_prompts",
    "make_sample",
    "parse_caption",
    "pixels_to_tensor",
    "render_clip",
    "resolve_shards",
    "sample_attributes",
    "tensor_to_pixels",
    "train_loader",
    "write_toy_shards",
]
