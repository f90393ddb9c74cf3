"""Compare two runs of one benchmark on the same questions: every metric's difference with a 95% interval.

The interval is a paired percentile bootstrap over the benchmark's scoring unit (the question; the MMVP pair; the
MME image, whose two questions make acc+): draw as many units as there are, with replacement; score run A and run
B on the *same* drawn units; repeat (1000 times by default, from a fixed seed, so the output is deterministic);
the interval is the 2.5th and 97.5th percentile of B − A. A unit drawn twice is put in twice, each copy with its
own question_id and unit (`id#j` for the j-th draw of that unit), so that scorers count the copies as distinct
questions and units.
"""
from __future__ import annotations

import random
from dataclasses import replace

from ..errors import MinivarError


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Nested metrics → {"random.f1": 0.87, "subtasks.OCR": 125.0, ...}: numeric leaves only (bools left out)."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def paired_bootstrap(bench, questions: list, texts_a: dict, texts_b: dict, resamples: int = 1000, seed: int = 0,
                     log=None) -> dict:
    """{metric: {"a", "b", "delta", "ci95": [low, high]}} for the answers `texts_a` and `texts_b` (question_id →
    text) to `questions`, in the benchmark's order."""
    if resamples < 1:
        raise MinivarError(f"--resamples must be ≥ 1, got {resamples}")
    units: dict[str, list] = {}                 # scoring unit → its questions, units in order of first appearance
    for q in questions:
        units.setdefault(q.scoring_unit, []).append(q)
    names = list(units)
    a = flatten(bench.score([(q, texts_a[q.question_id]) for q in questions]))
    b = flatten(bench.score([(q, texts_b[q.question_id]) for q in questions]))
    deltas: dict[str, list[float]] = {k: [] for k in a if k in b}
    rng = random.Random(seed)
    made: dict[tuple[str, int], list] = {}      # (unit, j) → the j-th copy of the unit's questions, made once
    for r in range(resamples):
        copies, seen = [], {}
        for unit in (names[rng.randrange(len(names))] for _ in names):
            j = seen[unit] = seen.get(unit, -1) + 1          # the j-th time this unit is drawn in this resample
            if (unit, j) not in made:
                made[unit, j] = [(replace(q, question_id=f"{q.question_id}#{j}", unit=f"{unit}#{j}"), q.question_id)
                                 for q in units[unit]]
            copies += made[unit, j]
        ra = flatten(bench.score([(c, texts_a[qid]) for c, qid in copies]))
        rb = flatten(bench.score([(c, texts_b[qid]) for c, qid in copies]))
        for key, values in deltas.items():
            if key in ra and key in rb:         # a metric of a subset no unit of this draw came from is left out
                values.append(rb[key] - ra[key])
        if log is not None and (r + 1) % max(1, resamples // 10) == 0:
            log(f"minivar: bootstrap {r + 1}/{resamples}")
    result = {}
    for key, values in deltas.items():
        values.sort()
        ci = [percentile(values, 2.5), percentile(values, 97.5)] if values else [None, None]
        result[key] = {"a": a[key], "b": b[key], "delta": b[key] - a[key], "ci95": ci}
    return result


def compare_runs(run_a, run_b, resamples: int = 1000, seed: int = 0, log=None) -> dict:
    """Two harness.RunData (complete, same benchmark and questions) → the comparison object --json prints."""
    if run_a.bench.name != run_b.bench.name:
        raise MinivarError(f"'{run_a.out}' is a {run_a.bench.name} run and '{run_b.out}' a {run_b.bench.name} run: "
                           f"compare runs of one benchmark")
    if [q.question_id for q in run_a.questions] != [q.question_id for q in run_b.questions] or \
            run_a.settings["questions"] != run_b.settings["questions"]:
        raise MinivarError(f"'{run_a.out}' and '{run_b.out}' did not answer the same questions (data or --limit differ)")
    for run in (run_a, run_b):
        if run.missing:
            raise MinivarError(f"'{run.out}' is incomplete: {len(run.missing)} of {len(run.questions)} questions "
                               f"have no answer (first: '{run.missing[0].question_id}')")
    changed = sum(run_a.answers[q.question_id] != run_b.answers[q.question_id] for q in run_a.questions)
    metrics = paired_bootstrap(run_a.bench, run_a.questions, run_a.answers, run_b.answers, resamples, seed, log)
    return {"bench": run_a.bench.name, "n": len(run_a.questions), "a": str(run_a.out), "b": str(run_b.out),
            "answers_changed": changed, "resamples": resamples, "seed": seed, "metrics": metrics}
