"""`python -m minivar.eval download BENCH`: fetch the Hugging Face hub copy of a benchmark's data into data/<bench>/.

Only some benchmarks have a hub copy the readers take; CHAIR and GQA come from their official sites, and this
command says where. Which copy is which version matters (POPE's hub copy is not the one LLaVA-1.5 was scored on):
see docs/eval.md.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import MinivarError

# bench → (hub dataset id, the files to fetch (None: all), what to tell the user about this copy)
HUB_COPIES = {
    "pope": ("lmms-lab/POPE", ["Full/*", "README.md"],
             "POPE as lmms-lab/POPE has it: 3 x 3000 questions with the COCO images inside (POPE commit edebdda; "
             "LLaVA-1.5's published numbers used commit e3e3926, whose random split has 2910)"),
    "mme": ("lmms-lab/MME", None, "MME, 2374 questions with their images"),
    "mmvp": ("MMVP/MMVP", None, "MMVP's Questions.csv and 'MMVP Images/' (the original labels, as the paper used)"),
    "cvbench": ("nyu-visionx/CV-Bench", None, "CV-Bench's test_2d/test_3d parquet files (images inside)"),
}
OFFICIAL_ONLY = {
    "chair": "CHAIR needs COCO 2014 from cocodataset.org: the val2014 images (val2014.zip) and "
             "annotations_trainval2014.zip (its instances_val2014.json and captions_val2014.json), and NLTK's data; "
             "pass the annotations folder as --data and the val2014 folder as --images",
    "gqa": "GQA comes from the official GQA v1.2 site (downloads.cs.stanford.edu/nlp/data/gqa/): images.zip and "
           "questions1.2.zip (testdev_balanced_questions.json), plus LLaVA's llava_gqa_testdev_balanced.jsonl from "
           "LLaVA's eval.zip; pass the json files as --data and the images folder as --images",
}


def download(bench: str, to: Path | None = None, snapshot=None, log=None,
             prog: str = "python -m minivar.eval") -> Path | None:
    """Download `bench`'s hub copy into `to` (default data/<bench>) and return it; None for CHAIR and GQA, whose
    sources are printed instead (log: where messages go, default the harness's logger). snapshot: huggingface_hub's
    snapshot_download (a parameter for tests); prog: the command named in the hint printed at the end."""
    if log is None:
        from .harness import stderr as log
    if bench in OFFICIAL_ONLY:
        log(OFFICIAL_ONLY[bench] + "; nothing was downloaded.")
        return None
    if bench not in HUB_COPIES:
        known = ", ".join(sorted(HUB_COPIES) + sorted(OFFICIAL_ONLY))
        raise MinivarError(f"unknown benchmark '{bench}' (choose from {known})")
    repo_id, patterns, what = HUB_COPIES[bench]
    target = Path(to) if to is not None else Path("data") / bench
    if snapshot is None:
        from huggingface_hub import snapshot_download as snapshot
    fresh = not target.exists()
    hint = (f"if you are offline, get the files of the dataset '{repo_id}' elsewhere and pass their folder as "
            f"--data (see docs/eval.md)")
    try:
        snapshot(repo_id, repo_type="dataset", local_dir=str(target), allow_patterns=patterns)
    except Exception as e:  # network errors come in many classes; all mean the same to the user
        _forget(target, fresh)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MinivarError(f"could not download '{repo_id}' ({type(e).__name__}: {reason[:200]}); {hint}") from None
    # Offline, huggingface_hub may hand back the local directory instead of raising: check that files arrived.
    if not target.is_dir() or not any(p.is_file() and ".cache" not in p.parts for p in target.rglob("*")):
        _forget(target, fresh)
        raise MinivarError(f"could not download '{repo_id}' (no files arrived); {hint}")
    log(f"{what}: in {target}. Run it with: {prog} run {bench} --data {target} --out runs/{bench}")
    return target


def _forget(target: Path, fresh: bool) -> None:
    """After a failed download, remove the folder if this attempt made it and it holds only the hub's cache."""
    if not fresh or not target.exists():
        return
    if all(".cache" in p.relative_to(target).parts or p.is_dir() for p in target.rglob("*")):
        import shutil
        shutil.rmtree(target)
