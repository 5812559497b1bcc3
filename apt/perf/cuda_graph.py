"""CUDA-graph capture of a backbone's fixed-shape inference forward (perf switch ``perf.cuda_graphs``).

The one-step generator runs the same forward with the same shapes every call, so the whole kernel
sequence (~36 blocks x ~30 kernels at 8B) can be recorded once and replayed with one launch
(``torch.cuda.CUDAGraph``). Each new input signature (shapes, dtypes) is captured once, after a
few warm-up calls on a side stream (as the PyTorch CUDA-graph notes require); inputs are copied
into static buffers before each replay and the output is returned as a fresh tensor.

Limits: inference only (``torch.no_grad``); the forward must not sync with the host (the built-in
DiT does not, except attention backend ``flash`` with a mask, which raises during capture; with
``text_padding`` trim / varlen the mask is read on the host before capture); memory
of the static buffers and the graph's private pool stays allocated while the wrapper lives.
"""

from __future__ import annotations

import torch
from torch import nn

from apt.models.backbone import TextCond


class CUDAGraphForward(nn.Module):
    """Wrap ``module(x_BCTHW, t_B, text)``; replays a captured CUDA graph per input signature."""

    def __init__(self, module: nn.Module, *, warmup_iters: int = 2):
        super().__init__()
        if not torch.cuda.is_available():
            raise RuntimeError("perf.cuda_graphs needs CUDA, but torch.cuda.is_available() is False (this torch build or machine has no GPU)")
        self.module = module
        self.warmup_iters = warmup_iters
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}

    # The backbone protocol passes through to the wrapped network.
    @property
    def blocks(self) -> nn.ModuleList:
        return self.module.blocks

    @property
    def config(self):
        return self.module.config

    @property
    def hidden_dim(self) -> int:
        return self.module.hidden_dim

    def visual_tokens(self, block_output: torch.Tensor) -> torch.Tensor:
        return self.module.visual_tokens(block_output)

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        self.module.check_input_shape(shape)

    @staticmethod
    def _signature(*tensors: torch.Tensor) -> tuple:
        return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)

    def _capture(self, inputs: tuple[torch.Tensor, ...]):
        with torch.inference_mode(False):  # normal tensors (with version counters), also when called under inference_mode
            static = tuple(t.clone() for t in inputs)

        def run() -> torch.Tensor:
            x, t, emb, mask = static
            return self.module(x, t, TextCond(emb, mask))

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_iters):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        return graph, static, out

    def forward(self, x_BCTHW: torch.Tensor, t_B: torch.Tensor, text: TextCond) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("CUDAGraphForward is inference-only: call it under torch.no_grad()")
        inputs = (x_BCTHW, t_B, text.emb_BLD, text.mask_BL)
        if not all(t.is_cuda for t in inputs):
            raise RuntimeError("CUDAGraphForward: inputs must be CUDA tensors (move the model and inputs to the GPU)")
        key = self._signature(*inputs)
        if getattr(self.module, "text_padding", "mask") != "mask":
            # trim / varlen fix at capture which text tokens are kept: one graph per mask pattern (read
            # here, outside the capture; the DiT reads the same static mask once while warming up)
            key += (tuple(text.mask_BL.bool().flatten().tolist()),)
        if key not in self._graphs:
            self._graphs[key] = self._capture(inputs)
        graph, static, out = self._graphs[key]
        for buf, value in zip(static, inputs):
            buf.copy_(value)
        graph.replay()
        return out.clone()
