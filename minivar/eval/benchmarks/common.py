"""Small helpers the benchmark readers share: finding files, reading JSON Lines and parquet, lazy image loaders.

Every helper raises `MinivarError` with one line naming the file (and line or row) at fault, so a reader never lets
a KeyError or a json traceback reach the user.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from minivar.errors import MinivarError

# LLaVA-1.5's short-answer instruction (LLaVA docs/Evaluation.md), baked into its POPE, MME and GQA question files.
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
# The multiple-choice instruction of LLaVA-1.5 and of the Cambrian scripts (CV-Bench, MMVP).
OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."


def as_paths(paths) -> list[Path]:
    """`paths` may be one path or a list of them; each must exist."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out = [Path(p) for p in paths]
    if not out:
        raise MinivarError("no data path given")
    for p in out:
        if not p.exists():
            raise MinivarError(f"{p}: no such file or folder")
    return out


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON Lines file; a bad line names file and line."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MinivarError(f"{path}: cannot read ({e})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if line.lstrip().startswith("["):
                raise MinivarError(f"{path}:{lineno}: a JSON array; this file must be JSON Lines, one JSON object "
                                   f"per line") from None
            raise MinivarError(f"{path}:{lineno}: not a JSON object ({e.msg}); this file must be JSON Lines, one "
                               f"JSON object per line") from None
        if isinstance(obj, list):
            raise MinivarError(f"{path}:{lineno}: a JSON array; this file must be JSON Lines, one JSON object per "
                               f"line")
        if not isinstance(obj, dict):
            raise MinivarError(f"{path}:{lineno}: not a JSON object; this file must be JSON Lines, one JSON object "
                               f"per line")
        rows.append((lineno, obj))
    return rows


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise MinivarError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise MinivarError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def need(record: dict, keys, where: str) -> None:
    """Every key of `keys` must be in `record`; `where` is "file:line" or "file row N"."""
    missing = [k for k in keys if k not in record]
    if missing:
        raise MinivarError(f"{where}: missing key {missing[0]!r}")


def pyarrow_parquet():
    """pyarrow.parquet, imported only when a parquet layout is read (pyarrow is an evaluation-only dependency)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MinivarError("reading parquet files needs pyarrow: pip install -r requirements-eval.txt") from None
    return pq


def read_parquet(files: list[Path], columns: list[str], optional: tuple = ()) -> list[tuple[str, dict]]:
    """("file row N", row dict) for every row of the shards, in file order then row order.

    `columns` must all be present (one clear error naming the file otherwise); `optional` ones are read when there.
    Image columns stay as their parquet struct {bytes, path}: decoding waits for `load_image`.
    """
    if not files:
        return []
    pq = pyarrow_parquet()
    out = []
    for f in files:
        try:
            schema = pq.read_schema(f)
        except Exception as e:          # pyarrow raises several types (ArrowInvalid, OSError) for a broken file
            raise MinivarError(f"{f}: not a readable parquet file ({str(e).splitlines()[0]})") from None
        names = set(schema.names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise MinivarError(f"{f}: no column {missing[0]!r} (columns: {', '.join(schema.names)})")
        wanted = list(columns) + [c for c in optional if c in names]
        table = pq.read_table(f, columns=wanted)
        for i, row in enumerate(table.to_pylist()):
            out.append((f"{f} row {i}", row))
    return out


def glob_sorted(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.is_file())


def open_rgb(source, name: str):
    """PIL image in RGB from a path or bytes, as LLaVA's loaders do (`Image.open(...).convert('RGB')`)."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise MinivarError(f"{name}: not a readable image ({e})") from None


def file_image(path: Path, question_id: str, check: bool = True):
    """A loader for an image file; the file must exist now (read time), it is decoded only when called."""
    if check and not path.is_file():
        raise MinivarError(f"image {path} of question {question_id} not found")
    return lambda: open_rgb(path, str(path))


def bytes_image(cell, where: str, question_id: str):
    """A loader for a parquet image cell {bytes, path} (the Hugging Face `Image` feature)."""
    data = cell.get("bytes") if isinstance(cell, dict) else cell if isinstance(cell, bytes) else None
    if not data:
        raise MinivarError(f"{where}: question {question_id} has no image bytes")
    return lambda: open_rgb(data, f"{where} (question {question_id})")


def no_image(question_id: str):
    """The loader of a question read only for scoring (need_images=False): pixels were never located."""
    def load():
        raise MinivarError(f"question {question_id} was read without its images (scoring only)")
    return load
