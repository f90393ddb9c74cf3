"""The benchmarks `python -m minivar.eval` knows, by name.

    from minivar.eval.benchmarks import get
    bench = get("pope")                   # a Benchmark: read(paths, images=...) -> [Question], score(answered) -> dict

BENCHMARKS maps a name to a zero-argument factory (a Benchmark class, or a function importing one lazily).
"""
from __future__ import annotations

from minivar.errors import MinivarError

from .base import Benchmark, Question
from .cvbench import CVBench
from .gqa import GQA
from .mme import MME
from .mmvp import MMVP
from .pope import Pope


def _chair() -> Benchmark:
    # CHAIR lives in chair.py (its own module and owner); imported only when asked for.
    from .chair import Chair
    return Chair()


BENCHMARKS = {"pope": Pope, "mme": MME, "chair": _chair, "mmvp": MMVP, "cvbench": CVBench, "gqa": GQA}


def get(name: str) -> Benchmark:
    """A fresh Benchmark for `name`; an unknown name is a MinivarError listing the known ones."""
    if name not in BENCHMARKS:
        raise MinivarError(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    return BENCHMARKS[name]()


__all__ = ["BENCHMARKS", "Benchmark", "Question", "get"]
