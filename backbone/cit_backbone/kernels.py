"""Faster kernels for the frozen LM on a CPU, numerically equal to PyTorch's own within rounding.

PyTorch's F.linear re-lays out each fp32 weight for oneDNN on every call; at decode batch sizes that costs more
than the multiply (all the LM's weights at batch 8 here: 55 ms, against 16 ms with the weights packed once; vLLM's
CPU build packs them the same way). oneDNN's packed linear has no backward, so anything that needs gradients
(training's backward into a connector or a LoRA) takes F.linear on the very same weight. bfloat16 weights are packed
too (a decode step at batch 8: 27 ms F.linear, 22.5 ms packed; float32 packed 27 ms).
"""
from __future__ import annotations

import torch

PACKED_DTYPES = (torch.float32, torch.bfloat16)


class PackedLinear(torch.nn.Linear):
    """A frozen float32 or bfloat16 CPU Linear that also keeps its weight in oneDNN's packed layout (not a buffer:
    it follows no .to(); an input or weight of another dtype or device takes F.linear)."""

    packed: torch.Tensor

    @classmethod
    def of(cls, linear: torch.nn.Linear) -> PackedLinear:
        packed = cls.__new__(cls)
        torch.nn.Module.__init__(packed)
        packed.in_features, packed.out_features = linear.in_features, linear.out_features
        packed.weight, packed.bias = linear.weight, linear.bias  # the same parameters: tied weights stay tied
        packed.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)) \
                or x.dtype != self.packed.dtype or self.weight.dtype != self.packed.dtype or x.device.type != "cpu":
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: torch.nn.Module) -> int:
    """Every float32 / bfloat16 CPU Linear of `model` becomes a PackedLinear (before any LoRA wraps one); how many
    did."""
    if not torch.backends.mkldnn.is_available():
        return 0
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear and module.weight.dtype in PACKED_DTYPES \
                and module.weight.device.type == "cpu":
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attribute, PackedLinear.of(module))
            swapped += 1
    return swapped
