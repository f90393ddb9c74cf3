"""What every benchmark of `python -m minivar.eval` provides: questions read from the real files, and a scorer.

The harness (minivar/eval/harness.py) only talks to benchmarks through this module:

    bench = BENCHMARKS["pope"]()                       # see benchmarks/__init__.py
    questions = bench.read([Path(...)], images=Path(...) or None)   # list[Question]; bad input -> MinivarError
    metrics = bench.score([(q, answer_text), ...])     # dict, the --json "metrics" object

Scorers never need image pixels. A scorer groups questions only by `Question.unit` (the benchmark's scoring unit:
the question, the MMVP pair, the MME image, the CHAIR image) and reads only `question_id`, `unit` and `meta`, so a
paired bootstrap can resample units by giving each copy fresh `question_id`/`unit` strings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Question:
    question_id: str                 # unique within a benchmark run (the official id, as a string)
    prompt: str                      # the user text exactly as LLaVA's evaluation gives it, without "<image>\n"
    image_key: str                   # questions with the same key are about the same image (grouping, sharding)
    load_image: Callable = field(compare=False, repr=False)   # () -> PIL.Image (RGB or any mode); errors: MinivarError
    unit: str = ""                   # scoring unit for the bootstrap; "" means the question itself
    meta: dict = field(default_factory=dict, compare=False)   # what the scorer needs: split, label, category, ...

    @property
    def scoring_unit(self) -> str:
        return self.unit or self.question_id


class Benchmark:
    """One benchmark: its reader, its official scorer and its LLaVA-1.5 evaluation defaults."""
    name: str = ""
    family: str = ""                 # VAR preset family: "hallucination" | "vision" | "general"
    max_new_tokens: int = 128        # LLaVA-1.5's evaluation setting for this benchmark
    conv_mode: str = "vicuna_v1"
    image_aspect_ratio: str = "pad"
    headline: str = ""               # the metric a progress bar shows as it runs (a key path, e.g. "mean.f1")

    def read(self, paths: list[Path], images: Path | None = None, **options) -> list[Question]:
        raise NotImplementedError

    def score(self, answered: list[tuple[Question, str]]) -> dict:
        raise NotImplementedError
