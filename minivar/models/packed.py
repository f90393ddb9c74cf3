"""A CPU speed path in bf16: Linear weights pre-packed once, at load, in oneDNN's blocked layout.

In bf16 on a CPU, PyTorch computes `F.linear` with oneDNN, and each call re-lays the weight out for the kernel.
A vision tower multiplies hundreds of rows at a time (577 per CLIP image, 1,024 for a 448² Qwen2-VL image), so
doing that layout once saves time: on the AMD EPYC of docs/performance.md, CLIP-L's 577-row products took 0.6–0.7×
and Qwen2-VL's 1,024-row ones 0.86–0.94× the time of `F.linear`. The numbers are the same: both go through oneDNN's
inner product, and a test holds the packed layers bit for bit against `F.linear` on this machine.

The towers are always packed (checkpoint.load_model). The decoder is packed only on request (`pack_decoder`), for
runs whose every decode step multiplies the weights by several rows — contrastive decoding's full and contrast
rows (DAMRO, VCD) —, which then skip the per-call re-layout too: on the reference configuration a two-row step
took 95.7 ms packed against 111.6 ms plain (bench_contrastive: DAMRO 9.94 instead of 6.99 tok/s). A single
prompt's decode multiplies them by one row, and for that PyTorch's own matrix-vector product on a plain weight is
the faster (66.9 vs 75.6 ms per step packed), so by default the decoder stays plain. A head tied to the embedding
stays plain either way (packing would copy it). Figures: docs/performance.md.
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


def pack_linears(module: nn.Module | None, under: tuple[str, ...] = ("",)) -> int:
    """Replace every bf16 CPU nn.Linear inside `module` by a PackedLinear, in place → how many were replaced
    (0 where oneDNN cannot run bf16 here). under: only those at or below these paths of `module` ("": all)."""
    if module is None or not available():
        return 0

    def wanted(path: str) -> bool:
        return any(u == "" or path == u or path.startswith(u + ".") for u in under)

    todo = [(parent, name) for where, parent in module.named_modules() for name, child in parent.named_children()
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu"
            and wanted(f"{where}.{name}" if where else name)]
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
