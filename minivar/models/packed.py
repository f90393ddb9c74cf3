"""A CPU speed path for the vision towers in bf16: their Linear weights pre-packed once, at load, in oneDNN's
blocked layout.

In bf16 on a CPU, PyTorch computes `F.linear` with oneDNN, and each call re-lays the weight out for the kernel.
A vision tower multiplies hundreds of rows at a time (577 per CLIP image, 1,024 for a 448² Qwen2-VL image), so
doing that layout once saves time: on the AMD EPYC of docs/performance.md, CLIP-L's 577-row products took 0.6–0.7×
and Qwen2-VL's 1,024-row ones 0.86–0.94× the time of `F.linear`. The numbers are the same: both go through oneDNN's
inner product, and a test holds the packed layers bit for bit against `F.linear` on this machine.

Only the towers are packed. The decoder keeps plain weights: at decode (one row per step) PyTorch's own
matrix-vector product reads a plain weight faster than oneDNN reads a packed one (71 vs 88 ms per step on the
reference configuration), and the decoder's weights are also read directly (tied embeddings, hooks).
"""
from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn as nn


def available() -> bool:
    """oneDNN is built in and runs bf16 on this CPU (AVX-512 BF16 or AMX); else `F.linear` is left as it is."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """y = x Wᵀ + b with W stored packed. The parameter names stay Linear's (`weight`, `bias`); `weight` is an opaque
    oneDNN tensor (its shape, dtype and device read as usual), so it is not a parameter: nothing trains or saves it,
    and `model.to(...)` does not move it (minivar loads onto the device it runs on; load with pack=False to move)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # batch-size hint 1: the layout oneDNN's reorder picks for it served every row count measured (1–1,024)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


def pack_linears(module: nn.Module | None) -> int:
    """Replace every bf16 CPU nn.Linear inside `module` by a PackedLinear, in place → how many were replaced
    (0 where oneDNN cannot run bf16 here)."""
    if module is None or not available():
        return 0
    todo = [(parent, name) for parent in module.modules() for name, child in parent.named_children()
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu"]
    for parent, name in todo:    # one at a time, holding no other reference: each plain weight is freed as it goes
        setattr(parent, name, PackedLinear(getattr(parent, name)))
        release_freed()
    return len(todo)


@functools.cache
def _malloc_trim():
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)       # glibc's; absent on macOS, Windows
    except (OSError, TypeError):
        return None


def release_freed() -> None:
    """Hand the plain weight just freed back to the OS. Its block can land in malloc's heap instead of a mapping of
    its own: glibc raises its mmap threshold whenever a mapped block of up to 32 MB is freed, which any earlier
    load in the process (a notebook that loads twice, bench.py's repeated loads) has done. The packed weights made
    next could not reuse those holes, so a second load peaked 0.37 GiB higher (3.17 vs 2.82 GiB on the reference
    configuration) until each was trimmed as it was made."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
