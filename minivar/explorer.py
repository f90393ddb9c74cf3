"""The attention explorer: one self-contained HTML page (explorer.html) next to the pictures of --save-attention.

The page (explorer_page.html: its script, style and the run's numbers all inline; no network, opens from file://)
shows, linked: the answer token by token, each panel of the image as the model saw it with the chosen token's
attention on its patches, the layer × head grid (with VAR's head selection recomputed from sliders), the sink
scores φ with a τ slider, and what each method changed. docs/explorer.md describes it.

What the page stores, and at which precision (a 7B answer of 32 tokens — 32 layers × 32 heads × 576 image tokens —
must fit in 25 MB; the page states these lines too). Its attention maps share BUDGET bytes (base64 adds a third):
  - the mean over heads of each (answer row, layer) attention map over the image tokens, before and — with VAR —
    after redistribution: 16 bits per value, scaled by the map's own maximum (absolute error ≤ max / 131,070); 8
    bits (≤ max / 510) where 16 would take more than half of BUDGET (a long answer, LLaVA-NeXT's 2,928 tokens);
  - each head's map: 4 bits per value, scaled by that map's maximum (error ≤ max / 30), for as many answer rows as
    fit in what the means leave of BUDGET (the rest: the mean over heads only);
  - each head's image-attention sum A and non-sink sum, the sink scores φ and the CLS attention: float32, exactly
    as minivar computed them (so the page's head selection and sink counts are minivar's, bit for bit).

A method contributes its own panel through a record (MethodRun.explorer, or damro_numbers for DAMRO), a dict with
"method", "kind" and "title"; the page draws three kinds (docs/explorer.md, "Records"):
  kind "patches"     {"panel": i, "marks": [cell index (row-major) in panel i], "values": [per cell] or None,
                      "colour": CSS colour of the marks (default green)}
  kind "candidates"  {"steps": [{"branches": {branch name: [{"id", "text", "logit", "prob"}, ...]}}, ...]}
  kind "table"       {"columns": [...], "rows": [[...], ...]}
and every method's report (--json's) as a table where it brings no record of its own.
"""
from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from .viz import shareable_model_name

PAGE_FILE = "explorer.html"
TEMPLATE = Path(__file__).with_name("explorer_page.html")
BUDGET = 13_500_000               # bytes of attention maps (base64 makes them 18 MB of the page)
TEXT_SINK_CANDIDATES = 24         # text tokens listed with their φ and attention share (highest φ first)
DATA_MARK = "/*MINIVAR_DATA*/null"


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def quantise(maps: torch.Tensor, bits: int) -> dict:
    """Maps [..., N] → 16 or 8 bits per value, each scaled by its own maximum: value = q / (2^bits − 1) · scale."""
    x = maps.float().clamp_min(0)
    scale = x.amax(-1, keepdim=True)
    top = (1 << bits) - 1
    q = torch.round(x / scale.clamp_min(1e-30) * top).to(torch.int32).numpy().astype("<u2" if bits == 16 else "u1")
    return {f"q{bits}": _b64(q), "scale": _b64(scale.squeeze(-1).numpy().astype("<f4")), "shape": list(x.shape)}


def quantise4(maps: torch.Tensor) -> dict:
    """Maps [..., N] → 4 bits per value (two per byte, the first in the low nibble), each map scaled by its own
    maximum: value = q / 15 · scale."""
    x = maps.float().clamp_min(0)
    scale = x.amax(-1, keepdim=True)
    q = (x / scale.clamp_min(1e-30) * 15).round_().to(torch.uint8).flatten()
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    packed = q[0::2] | (q[1::2] << 4)
    return {"q4": _b64(packed.numpy()), "scale": _b64(scale.squeeze(-1).numpy().astype("<f4")), "shape": list(x.shape)}


def f32(t) -> dict:
    a = np.asarray(t.float().numpy() if isinstance(t, torch.Tensor) else t, dtype="<f4")
    return {"f32": _b64(a), "shape": list(a.shape)}


def png_data_url(im) -> str:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each generated id's text as the stream decoder prints it (pieces joined = the answer); a piece held back
    (part of a character) is '' until the token that completes it."""
    stream = tokenizer.decode_token_stream()
    pieces = [stream.push(i) for i in ids]
    if pieces:
        pieces[-1] += stream.flush()
    return pieces


def vocab_piece(tokenizer, token_id: int) -> str:
    """One id's vocabulary entry ("<s>", "▁."), the clearest name of a prompt token out of context."""
    tok = getattr(tokenizer, "_tok", None)
    piece = tok.id_to_token(int(token_id)) if tok is not None else None
    return piece if piece is not None else tokenizer.decode([int(token_id)])


def mean_bits(R: int, L: int, N: int, kinds: int, budget: int = BUDGET) -> int:
    """16 bits for the mean maps where they take at most half the budget, else 8."""
    return 16 if R * L * N * 2 * kinds <= budget / 2 else 8


def head_rows_kept(R: int, L: int, H: int, N: int, budget: int) -> int:
    """How many answer rows keep per-head maps within `budget` bytes at 4 bits a value."""
    per_row = L * H * N / 2
    return int(min(R, math.floor(budget / per_row))) if per_row else R


def explorer_data(capture, numbers: dict, views, *, tokenizer, output_ids: list[int], prompt_ids: list[int],
                  reports: dict, records: dict, var, b: int = 0, budget: int = BUDGET) -> dict:
    """The page's numbers from a run's Capture (every layer's attention of the answer rows, head sums, φ) and
    attention.json's numbers (`numbers`: layout, sinks, DAMRO); views: one PIL image per panel (None: not drawn)."""
    start, end = numbers["image_span"]
    L, H = numbers["n_layers"], numbers["n_heads"]
    probs = capture.attention_probs
    missing = [layer for layer in range(L) if layer not in probs]
    if missing:
        raise ValueError(f"the capture has no attention for layers {missing}: the explorer needs every layer")
    rows = capture.rows
    R, N = len(rows), end - start
    kinds = ["before", "after"] if var is not None else ["before"]
    data = {"version": 1, "model": shareable_model_name(numbers.get("model") or ""), "prompt": numbers.get("prompt"),
            "answer": numbers.get("answer"), "n_layers": L, "n_heads": H, "n_image": N, "image_span": [start, end],
            "panels": numbers["panels"], "newline_tokens": numbers["newline_tokens"],
            "layer_range": numbers["layer_range"], "image_aspect_ratio": numbers.get("image_aspect_ratio")}
    pieces = token_pieces(tokenizer, output_ids)
    # row r produces answer token r: row 0 is the prompt's last row; a row past the answer produced the stop token
    data["tokens"] = [{"row": r, "position": pos,
                       "text": pieces[r] if r < len(pieces) else "",
                       "id": output_ids[r] if r < len(output_ids) else None,
                       "label": ("(prompt's last row) " if r == 0 else "") +
                                (repr(pieces[r])[1:-1] if r < len(pieces) else "(stop)")}
                      for r, pos in enumerate(rows)]
    data["views"] = [None if v is None else {"src": png_data_url(v), "width": v.width, "height": v.height}
                     for v in views]
    # attention over the image tokens: [R, L, H, N] per kind
    maps = {k: torch.stack([probs[layer][k][b, :, :, start:end] for layer in range(L)]).permute(2, 0, 1, 3)
            for k in kinds}
    bits = mean_bits(R, L, N, len(maps), budget)
    data["attention"] = {k: quantise(m.mean(2), bits) for k, m in maps.items()}
    kept = head_rows_kept(R, L, H, N, budget - R * L * N * bits // 8 * len(maps))
    data["heads_attention"] = quantise4(maps["before"][:kept]) if kept else None
    data["head_rows_kept"] = kept
    # each head's A and non-sink sum per row (as VAR's selection reads them), float32: [R, L, H]
    stats = capture.head_stats

    def per_row(key):                                  # [R, L, H] of a head statistic
        return f32(torch.stack([stats[layer][key][b] for layer in range(L)]).permute(2, 0, 1))
    data["head_stats"] = {"image": per_row("image_before"), "nonsink": per_row("nonsink_before")}
    if numbers["selection_rule"]["rule"] == "official" and all("official_portion_before" in stats[layer]
                                                               for layer in range(L)):
        data["head_stats"]["portion"] = per_row("official_portion_before")
    if var is not None:
        sel = [capture.selected(layer) for layer in range(L)]
        if all(s is not None for s in sel):
            data["var_selected"] = f32(torch.stack([s[b] for s in sel]).permute(2, 0, 1).float())
    data["var"] = numbers.get("var")
    data["selection_rule"] = numbers["selection_rule"]
    # sinks: φ of every prompt token per layer (float32, minivar's numbers), the image tokens' slice and text tokens
    phi = capture.phi
    data["sinks"] = {"dims": numbers["sink_dims"], "tau": numbers["tau"],
                     "rule": (numbers.get("var") or {}).get("rule", "paper"),
                     "sink_layers": _sink_layers(numbers, L),
                     "visual_sinks": numbers["visual_sinks"]}
    if phi:
        all_phi = torch.stack([phi[layer][b] for layer in range(L)])            # [L, T]
        data["sinks"]["phi"] = f32(all_phi[:, start:end])
        top = all_phi.amax(0)                                                   # each token's largest φ
        top[start:end] = -1.0                                                   # text tokens only
        n_text = all_phi.shape[1] - (end - start)
        best = sorted(top.topk(min(TEXT_SINK_CANDIDATES, n_text)).indices.tolist())
        shares = torch.stack([probs[layer]["before"][b, :, :, best].mean(0) for layer in range(L)])   # [L, R, n]
        data["text_sinks"] = [{"position": j,
                               "piece": vocab_piece(tokenizer, prompt_ids[j]) if j < len(prompt_ids) else "",
                               "phi": [float(x) for x in all_phi[:, j].tolist()],
                               "share": f32(shares[:, :, i].T)}                  # [R, L]: mean over heads
                              for i, j in enumerate(best)]
    else:
        data["text_sinks"] = []
    data["methods"] = method_records(numbers, reports, records)
    data["precision"] = precision_lines(bits, kept, R)
    return data


def _sink_layers(numbers: dict, L: int) -> list[int]:
    """The layers whose tokens can be sinks: every layer (paper), 2..L−1 under the released code's rule."""
    rule = (numbers.get("var") or {}).get("rule", "paper")
    if rule == "official":
        from .methods.var_official import official_layer_sets
        return sorted(official_layer_sets(L)[0])
    return list(range(L))


def method_records(numbers: dict, reports: dict, records: dict) -> list[dict]:
    """Every method's panels: its own records (MethodRun.explorer), DAMRO's outliers on the image from
    attention.json, and each report as a table (the settings and what --json says)."""
    out = []
    if numbers.get("damro"):
        d = numbers["damro"]
        marks, values = d["outliers"], d["cls_attention"]
        if "grid" in d:          # InternVL: scores per patch, the panel's cells per token (s×s patches each)
            p, cols = numbers["panels"][d["panel"]], d["grid"][1]
            s = cols // p["cols"]

            def cell(i):
                return (i // cols // s) * p["cols"] + (i % cols) // s

            marks = list(dict.fromkeys(cell(i) for i in marks))     # the contrast image's tokens
            values = [0.0] * (p["rows"] * p["cols"])
            for i, v in enumerate(d["cls_attention"]):             # a token's heat: its patches' highest score
                values[cell(i)] = max(values[cell(i)], v)
        out.append({"method": "damro", "kind": "patches", "panel": d["panel"], "marks": marks,
                    "values": values,
                    "title": f"DAMRO: the ViT's {len(d['outliers'])} outlier tokens (top-k CLS attention, vision "
                             f"layer {d['layer']})",
                    "legend": "green = outlier token (the contrast branch's image); heat = CLS attention"})
    masked = numbers.get("masked") or {}
    if masked.get("kind") == "random_image_tokens":      # (masked visual sinks: the sinks, drawn anyway)
        from .viz import token_cells
        cells = token_cells(numbers)
        for i, p in enumerate(numbers["panels"]):
            marks = sorted(cells[o][1] * p["cols"] + cells[o][2] for o in masked["patches"]
                           if 0 <= o < len(cells) and cells[o] is not None and cells[o][0] == i)
            if marks:
                out.append({"method": "mask", "kind": "patches", "panel": i, "marks": marks, "values": None,
                            "colour": "#00ffff", "title": f"{len(marks)} random image tokens masked on the "
                                                          f"{p['name']} panel (seed {masked['seed']})",
                            "legend": "cyan = masked: its key removed in every layer, so no attention reaches it"})
    for name, recs in records.items():
        out.extend(dict(r, method=r.get("method", name)) for r in recs)
    for name, report in reports.items():
        flat = [[k, json.dumps(v) if isinstance(v, (dict, list)) else v] for k, v in report.items()
                if not (isinstance(v, (dict, list)) and len(json.dumps(v)) > 400)]
        out.append({"method": name, "kind": "table", "title": f"{name}: its report (as --json gives it)",
                    "columns": ["key", "value"], "rows": flat})
    return out


def precision_lines(bits: int, kept: int, R: int) -> list[str]:
    return [f"mean over heads of each (token, layer) map: {bits} bits, scaled by the map's maximum "
            f"(absolute error at most max/{2 * ((1 << bits) - 1)})",
            f"single heads: 4 bits, scaled by each map's maximum (error at most max/30), for {kept} of {R} answer "
            "rows" + ("" if kept == R else " (the others: the mean over heads only)"),
            "head sums A and non-sink sums, sink scores phi, CLS attention: float32 as computed (exact)"]


def page(data: dict) -> str:
    """The HTML of the page: the template with the data inlined as JSON in a script element, every '<' written
    \\u003c (the same JSON), so no text in it — a prompt, an answer — can end or change that element."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    template = TEMPLATE.read_text(encoding="utf-8")
    if DATA_MARK not in template:
        raise RuntimeError(f"{TEMPLATE} has no data mark")
    return template.replace(DATA_MARK, text, 1)


def candidate_steps(steps: list[list[dict]], tokenizer) -> list[dict]:
    """A contrastive run's per-step top-k (ids) with each id's text filled in."""
    return [{"branches": {name: [dict(c, text=vocab_piece(tokenizer, c["id"])) for c in cands]
                          for name, cands in step.items()}} for step in steps]
