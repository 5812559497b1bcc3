"""DeepSpeed engines as the APT step sees them: one engine per network (G, D).

- ``EngineUpdate``: the step's ``NetUpdate`` (``apt.methods.update``) for an engine:
  ``fabric.backward(loss, model=engine)`` names the engine; the engine steps only at its
  gradient-accumulation boundary.
- ``BypassWhenFrozen``: D through its engine in the D step, straight into the engine's module in the
  G step (the step freezes D there, which two ZeRO engines need).
"""

from __future__ import annotations

import torch


class EngineUpdate:
    """``NetUpdate`` for one DeepSpeed engine with ``accumulate`` micro-batches per update.

    The engine counts micro-steps and only steps at its accumulation boundary; the step already
    divides each micro-batch loss by the count, so the engine must not scale it again.
    """

    def __init__(self, fabric, net, accumulate: int):
        self.fabric, self.net, self.accumulate = fabric, net, accumulate
        self.engine = net._forward_module
        self.pending = 0

    def zero_grad(self) -> None:
        assert self.pending == 0, "an update was left half accumulated"  # the engine clears gradients in step()

    def backward(self, loss: torch.Tensor) -> None:
        self.fabric.backward(loss, model=self.net, scale_wrt_gas=False)
        self.pending += 1
        if self.pending < self.accumulate:
            self.engine.step()  # a micro-step: no update before the boundary

    def step(self) -> torch.Tensor:
        if self.pending != self.accumulate:
            raise RuntimeError(f"{self.pending} micro-batches backpropagated, expected {self.accumulate}")
        assert self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        self.pending = 0
        norm = self.engine.get_global_grad_norm()
        return torch.tensor(float("nan") if norm is None else float(norm))


class BypassWhenFrozen(torch.nn.Module):
    """D as the step calls it: through its engine while D trains (D step), straight into the engine's
    module while D is frozen (G step).

    Why: a DeepSpeed engine hooks its forward's outputs into whatever backward later passes through
    them (deepspeed 0.19: ``register_output_backward_hooks``), so G's backward through D would run D's
    gradient-reduction epilogue with no D gradients (IndexError in ``reduce_ipg_grads``, measured).
    Bypassing D's engine in the G step keeps G's backward G's alone; ZeRO-3 still gathers D's
    parameters through its module hooks. Inputs are cast to the engine's precision as Fabric would.
    """

    def __init__(self, fabric_module, precision):
        super().__init__()
        self.fabric_module = fabric_module
        self._precision = precision
        self._trainable = [p for p in fabric_module.parameters() if p.requires_grad]

    def forward(self, *args, **kwargs):
        if not self._trainable or self._trainable[0].requires_grad:
            return self.fabric_module(*args, **kwargs)
        args, kwargs = self._precision.convert_input((args, kwargs))
        with self._precision.forward_context():
            out = self.fabric_module._forward_module.module(*args, **kwargs)
        return self._precision.convert_output(out)

    def __getattr__(self, item):
        try:
            return super().__getattr__(item)
        except AttributeError:
            return getattr(super().__getattr__("fabric_module"), item)
