"""Evaluation: run LLaVA-1.5 (with or without VAR) over a benchmark, score it, compare two runs.

    python -m minivar.eval run pope --data data/pope --out runs/pope-base
    python -m minivar.eval run pope --data data/pope --out runs/pope-var --var
    python -m minivar.eval compare runs/pope-base runs/pope-var

Modules: harness.py (run, resume, shards, run directories, score), compare.py (paired bootstrap), download.py (hub
copies of the data), benchmarks/ (readers and official scorers, one module per benchmark), __main__.py (the CLI).
See docs/eval.md for what each benchmark needs and costs.
"""

# Written into run.json when the installed minivar has no __version__ of its own.
VERSION = "0.1.0"


def minivar_version() -> str:
    import minivar
    return getattr(minivar, "__version__", VERSION)
