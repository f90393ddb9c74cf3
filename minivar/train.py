"""Train a baby LLaVA from scratch on the scene world (minivar/scenes.py), on a CPU, in minutes.

    python -m minivar.train --out weights/baby --minutes 10        # train; writes a llava-hf checkpoint
    python -m minivar.train --eval weights/baby                     # accuracy per question kind, held-out scenes
    python -m minivar.train --make-pope data/baby-pope              # a POPE-format benchmark of held-out scenes

The model is LLaVA-1.5's architecture at toy size (models/llava.py, unchanged): a CLIP-style ViT, the 2-layer GELU
projector and a LLaMA decoder, with a byte-level BPE tokenizer (the demo's tokenizer family, with merges learned on
the scene world's words so a prompt is tens of tokens, not hundreds of bytes). Everything trains end to end with
AdamW; the loss is on the answer's tokens (and the </s> that ends it) only; every batch is drawn fresh from the scene
world, so there is no dataset on disk and no epoch.

The demo's sinks are planted before training (demo.plant_sinks: a massive BOS dim, a few image patches made into
visual sinks, sink-reading query/key columns) and the planted entries are written back after every step, so the
model learns around them as a trained LLaVA lives with its own: VAR then has sinks to find and heads to act on.
The decoder's hidden size is 512 because VAR's sink score φ of a token is at most √hidden, and τ = 20 needs > 400.

The checkpoint is written in the llava-hf layout (config.json, tokenizer.json, model.safetensors), so minivar's
loader and transformers' LlavaForConditionalGeneration both read it.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import scenes
from .errors import MinivarError
from .eval.benchmarks.common import SHORT_ANSWER

CONV_MODES = (("vicuna_v1", 0.6), ("llava_hf", 0.2), ("llava_v1", 0.2))   # the templates it learns, and how often
SPECIALS = ("<unk>", "<s>", "</s>", "<image>", "<pad>")                    # ids 0…4
SINK_DIMS = (37, 301)            # (text sink dim, visual sink dim), as the random demo
SINK_PATCHES = (12, 47, 88)      # grid cells (row-major on the 10×10 grid) planted as visual sinks
COMMON_DIM = 5
TRAIN_SIZES = (96, 224)          # training images: width and height drawn from this range


def baby_config(vocab_size: int, tiny: bool = False):
    """The baby's shape. tiny=True: a much smaller model of the same kind, for tests of the training loop."""
    from .models.config import LlavaConfig, TextConfig, VisionConfig
    if tiny:
        vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=160, patch_size=16)
        text = TextConfig(vocab_size=vocab_size, hidden_size=448, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024,
                          rms_norm_eps=1e-5)
    else:
        # 160 px in 16 px patches: a 10×10 grid, 100 image tokens; shapes cover 1–3 patches a side
        vision = VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                              image_size=160, patch_size=16)
        text = TextConfig(vocab_size=vocab_size, hidden_size=512, intermediate_size=768, num_hidden_layers=3,
                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                          rms_norm_eps=1e-5)
    # vision_feature_layer −1: the tower's last layer feeds the projector (LLaVA-1.5 skips its last one, −2; a model
    # trained from scratch has no reason to carry a layer it never reads)
    return LlavaConfig(vision=vision, text=text, image_token_index=SPECIALS.index("<image>"),
                       pad_token_id=SPECIALS.index("<pad>"), vision_feature_layer=-1, torch_dtype="float32",
                       name_or_path="minivar-baby")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE whose merges are learned on the templates and the scene world's questions and answers


def make_tokenizer(vocab_size: int = 512, seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from .processing import _TEMPLATES
    rng = random.Random(seed)
    corpus = []
    for before, after in _TEMPLATES.values():
        corpus += [before, after.replace("{prompt}", ""), SHORT_ANSWER] * 50
    for _ in range(4000):
        _, q = scenes.sample(rng, size_range=(32, 48))
        corpus += [q.text, " " + q.answer]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


# ---------------------------------------------------------------------------------------------------------------
# Data: (image, question, answer) → pixels, ids and the loss mask


class Batcher:
    """Draws training examples from the scene world and turns them into the model's inputs."""

    def __init__(self, cfg, tokenizer_dir: Path, rng: random.Random):
        from .processing import Tokenizer
        self.cfg, self.rng = cfg, rng
        self.tok = Tokenizer(tokenizer_dir, cfg.image_token_index)
        self.n_image = cfg.num_image_tokens

    def text_of(self, question) -> str:
        if question.kind != "caption" and self.rng.random() < 0.3:
            return question.text + SHORT_ANSWER   # LLaVA-1.5's short-answer instruction, which POPE's prompt carries
        return question.text

    def example(self, scene, questions, conv_mode):
        """One conversation about one image, as LLaVA trains: the first turn exactly the prompt minivar builds at
        inference, later turns "USER: … ASSISTANT:" after the previous answer's </s>; the targets are the answers."""
        from .models.llava import llava_image
        ids = self.tok.encode_prompt(self.text_of(questions[0]), conv_mode, self.n_image)
        targets = [-100] * len(ids)
        for i, q in enumerate(questions):
            if i:
                turn = self.tok._tok.encode(f"USER: {self.text_of(q)} ASSISTANT:", add_special_tokens=False).ids
                ids, targets = ids + turn, targets + [-100] * len(turn)
            answer = self.tok._tok.encode(" " + q.answer, add_special_tokens=False).ids + [self.tok.eos_id]
            ids, targets = ids + answer, targets + answer
        pixels = llava_image(scene.image(), self.cfg, "pad").pixel_values
        return pixels, ids, targets

    def conversation(self, turns: int):
        """A scene and `turns` questions about it (kinds drawn at random; each one the scene can carry)."""
        scene, first = scenes.sample(self.rng, size_range=TRAIN_SIZES)
        questions = [first]
        while len(questions) < turns:
            q = scenes.questions(scene, self.rng, self.rng.choice(scenes.KINDS))
            if q is not None and q.text not in {x.text for x in questions}:
                questions.append(q)
        return scene, questions

    def batch(self, size: int, turns: int = 1):
        modes, weights = zip(*CONV_MODES)
        rows = [self.example(*self.conversation(self.rng.randint(1, turns)), self.rng.choices(modes, weights)[0])
                for _ in range(size)]
        return collate(rows, self.cfg.pad_token_id)


def collate(rows, pad_id: int):
    """Right-padded ids [B, T] and next-token targets [B, T] (−100 where no answer token comes next)."""
    T = max(len(ids) for _, ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (_, seq, tgt) in enumerate(rows):
        ids[i, :len(seq)] = torch.tensor(seq)
        targets[i, :len(seq) - 1] = torch.tensor(tgt[1:])       # position t predicts token t+1
    return torch.stack([px for px, _, _ in rows]), ids, targets


# ---------------------------------------------------------------------------------------------------------------
# The model, its planted sinks, training


def initial_state(cfg, seed: int) -> dict[str, torch.Tensor]:
    from .demo import plant_sinks, random_state_dict
    state = random_state_dict(cfg, seed)
    plant_sinks(state, cfg, text_dim=SINK_DIMS[0], visual_dim=SINK_DIMS[1], common_dim=COMMON_DIM,
                patches=SINK_PATCHES)
    return state


def planted_entries(state, cfg) -> list[tuple[str, tuple, torch.Tensor]]:
    """The (parameter, index, value) entries that make the sinks; written back after every step."""
    t, hd = cfg.text, cfg.text.head_dim
    out = [("language_model.model.embed_tokens.weight", (1, SINK_DIMS[0])),
           ("language_model.model.embed_tokens.weight", (1, SINK_DIMS[1])),
           ("multi_modal_projector.linear_1.weight", (0,)), ("multi_modal_projector.linear_1.bias", (0,)),
           ("multi_modal_projector.linear_2.weight", (slice(None), 0))]
    out += [("vision_tower.embeddings.position_embedding.weight", (1 + p, 0)) for p in SINK_PATCHES]
    for layer in range(t.num_hidden_layers):
        out.append((f"language_model.model.layers.{layer}.self_attn.q_proj.weight", (slice(None), COMMON_DIM)))
        for dim in SINK_DIMS:
            out.append((f"language_model.model.layers.{layer}.self_attn.k_proj.weight", (slice(None), dim)))
    return [(name, index, state[name][index].clone()) for name, index in out]


def build_model(cfg, state):
    from .models.llava import Llava
    model = Llava(cfg)
    model.load_state_dict(state, strict=True)
    return model


def restore(model, entries) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, index, value in entries:
            params[name][index] = value


def loss_of(model, pixels, ids, targets) -> torch.Tensor:
    logits = model(ids, images=pixels)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


@torch.no_grad()
def held_out_accuracy(model, pixels, ids, targets) -> float:
    """The share of examples whose every answer token is the model's top choice (teacher-forced): what greedy
    decoding would answer, without the decoding loop."""
    hit = (model(ids, images=pixels).argmax(-1) == targets) | (targets == -100)
    return hit.all(-1).float().mean().item()


def train(out: Path, *, seed: int = 0, minutes: float | None = None, steps: int | None = None, batch_size: int = 16,
          turns: int = 4, lr: float = 2e-3, warmup: int = 30, eval_every: int = 25, tiny: bool = False,
          log=None) -> dict:
    """Train and write the checkpoint into `out`. Stops after `steps`, or when `minutes` run out (the learning rate
    follows a cosine to 10 % over the planned steps, or over the time budget). Returns the training record."""
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(seed=seed)
    cfg = baby_config(tok.get_vocab_size(), tiny)
    tmp = out / ".tokenizer"
    tmp.mkdir(exist_ok=True)
    tok.save(str(tmp / "tokenizer.json"))
    state = initial_state(cfg, seed)
    entries = planted_entries(state, cfg)
    model = build_model(cfg, state).train()
    matrices = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    others = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.01}, {"params": others, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    data = Batcher(cfg, tmp, random.Random(seed))
    held_out = Batcher(cfg, tmp, random.Random(seed + 10_000)).batch(4 * batch_size)   # fixed, never trained on
    bar = Progress(steps, minutes, log)
    record = {"seed": seed, "batch_size": batch_size, "turns": turns, "lr": lr, "loss": [], "held_out_accuracy": []}
    step, acc = 0, float("nan")
    while not bar.done(step):
        # linear warm-up, then a cosine from lr to lr/10 over the run (by steps, or by the clock)
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * bar.progress(step))))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        loss = loss_of(model, *data.batch(batch_size, turns))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        restore(model, entries)          # the planted sinks stay as planted
        step += 1
        record["loss"].append(round(loss.item(), 4))
        if step % eval_every == 0:
            acc = held_out_accuracy(model.eval(), *held_out)
            model.train()
            record["held_out_accuracy"].append((step, round(acc, 4)))
        bar.show(step, loss.item(), acc)
    bar.close()
    record.update(steps=step, seconds=round(bar.elapsed(), 1))
    save(model.eval(), cfg, tok, out)
    (out / "training.json").write_text(json.dumps(record, indent=1))
    (tmp / "tokenizer.json").unlink()
    tmp.rmdir()
    return record


class Progress:
    """A one-line progress bar (a line per update when not on a terminal): step, time, loss, held-out accuracy."""

    def __init__(self, steps: int | None, minutes: float | None, log=None):
        self.steps, self.budget = steps, (minutes * 60 if minutes else None)
        self.start, self.log = time.time(), log
        self.tty = log is None and sys.stderr.isatty()

    def elapsed(self) -> float:
        return time.time() - self.start

    def progress(self, step: int) -> float:
        return min(1.0, step / self.steps if self.steps else self.elapsed() / self.budget)

    def done(self, step: int) -> bool:
        return (self.steps is not None and step >= self.steps) or (self.budget is not None and
                                                                     self.elapsed() >= self.budget)

    def show(self, step: int, loss: float, acc: float) -> None:
        filled = int(30 * self.progress(step))
        line = (f"[{'#' * filled}{'.' * (30 - filled)}] step {step}  {self.elapsed():5.0f} s  loss {loss:.3f}  "
                f"held-out acc {acc:.1%}")
        if self.log is not None:
            self.log(line)
        elif self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif step % 25 == 0:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def save(model, cfg, tok, out: Path, dtype=torch.float16) -> None:
    """The checkpoint in the llava-hf (4.x hub) layout: the names transformers and minivar's loader both read."""
    from safetensors.torch import save_file
    state = {}
    for name, value in model.state_dict().items():
        if name.startswith("vision_tower."):
            name = "vision_tower.vision_model." + name.removeprefix("vision_tower.")
        state[name] = value.detach().to(dtype).contiguous()
    # CLIP's post_layernorm: in every llava-hf checkpoint, never read by LLaVA (it feeds CLIP's pooled output)
    width = cfg.vision.hidden_size
    state["vision_tower.vision_model.post_layernorm.weight"] = torch.ones(width, dtype=dtype)
    state["vision_tower.vision_model.post_layernorm.bias"] = torch.zeros(width, dtype=dtype)
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    hf = cfg.to_hf() | {"dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    tmp.replace(out / "model.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Evaluation on held-out scenes


def held_out_set(n_per_kind: int, seed: int = 1234):
    """`n_per_kind` (scene, question) pairs of each kind, drawn with a seed the training never uses."""
    rng = random.Random(("held-out", seed).__repr__())
    return [scenes.sample(rng, kind, size_range=TRAIN_SIZES) for kind in scenes.KINDS for _ in range(n_per_kind)]


def correct(q: scenes.Question, answer: str) -> bool:
    a = answer.strip()
    if q.kind == "caption":
        return a == q.answer
    return a.rstrip(".").lower() == q.answer.lower()


def evaluate(directory, n_per_kind: int = 40, seed: int = 1234, methods=None, pipe=None, batch: int = 16) -> dict:
    """Accuracy per question kind (and the answers) of the checkpoint in `directory` on a fresh held-out set."""
    import minivar
    pipe = pipe or minivar.load(str(directory), device="cpu", dtype="float32")
    items = held_out_set(n_per_kind, seed)
    hits = {k: [] for k in scenes.KINDS}
    answers = []
    for scene, q in items:
        r = pipe.generate(scene.image(), q.text, max_new_tokens=24, methods=methods or ())
        ok = correct(q, r.text)
        hits[q.kind].append(ok)
        answers.append({"kind": q.kind, "question": q.text, "answer": q.answer, "model": r.text.strip(), "ok": ok})
    acc = {k: sum(v) / len(v) for k, v in hits.items() if v}
    return {"accuracy": acc, "n_per_kind": n_per_kind, "answers": answers}


def object_cells(scene, shape, image_size: int, grid: int) -> set[int]:
    """The grid cells (row-major) a shape's box covers once the image is padded to a square and resized, as the
    "pad" image mode does (processing.expand_to_square: the image centred on a square of side max(W, H))."""
    side = max(scene.width, scene.height)
    dx, dy = (side - scene.width) // 2, (side - scene.height) // 2
    cell = side / grid                    # a grid cell in the padded image's pixels
    l, t, r, b = shape.box
    cols = range(int((l + dx) // cell), int(math.ceil((r + dx) / cell)))
    rows = range(int((t + dy) // cell), int(math.ceil((b + dy) / cell)))
    return {y * grid + x for y in rows for x in cols if 0 <= y < grid and 0 <= x < grid}


def attention_peaks(pipe, n: int = 40, seed: int = 77, layers=None, exclude_sinks: bool = True) -> dict:
    """For "What colour is the {shape}?" on `n` held-out scenes with exactly one such shape: where the row that
    answers (the prompt's last) puts its image attention, averaged over the heads of the middle layers. A hit is
    the peak patch inside the asked shape's cells. exclude_sinks: the planted visual-sink patches are left out of
    the peak (they draw attention whatever the question, which is what VAR is about)."""
    cfg = pipe.config
    grid = cfg.vision.image_size // cfg.vision.patch_size
    L = cfg.text.num_hidden_layers
    layers = list(layers if layers is not None else range(1, max(2, L - 1)))   # the middle layers
    rng = random.Random(("attention", seed).__repr__())
    hits, chance = [], []
    for _ in range(n):
        while True:
            scene = scenes.make_scene(rng, rng.randint(*TRAIN_SIZES), rng.randint(*TRAIN_SIZES))
            q = scenes.questions(scene, rng, "colour")
            if q is not None:
                break
        shape = next(s for s in scene.shapes if f"the {s.kind}?" in q.text)
        cap = pipe.capture(scene.image(), q.text, layers=layers, attention=("before",), rows="answer")
        lo, hi = cap.image_span()
        attn = torch.stack([cap.attention_probs[layer]["before"][0, :, -1, lo:hi] for layer in layers]).mean((0, 1))
        if exclude_sinks:
            attn[list(SINK_PATCHES)] = -1.0
        cells = object_cells(scene, shape, cfg.vision.image_size, grid)
        hits.append(int(attn.argmax()) in cells)
        chance.append(len(cells) / (grid * grid))
    return {"rate": sum(hits) / n, "chance": sum(chance) / n, "n": n, "layers": layers}


# ---------------------------------------------------------------------------------------------------------------
# A POPE-format benchmark from held-out scenes


def make_pope(directory, n_images: int = 100, seed: int = 4321, size: int = 320) -> dict:
    """Write POPE's three splits over `n_images` held-out scenes: COCO-style image names under val2014/ and
    coco_pope_{random,popular,adversarial}.json (one JSON object per line: question_id, image, text, label), each
    image asked about 3 present and 3 absent (colour, shape) pairs, the negatives chosen by the split's strategy."""
    directory = Path(directory)
    (directory / "val2014").mkdir(parents=True, exist_ok=True)
    rng = random.Random(("pope", seed).__repr__())
    imgs = [scenes.make_scene(rng, size, size, n_shapes=rng.randint(2, 4)) for _ in range(n_images)]
    popularity: dict = {}
    for sc in imgs:
        for s in sc.shapes:
            popularity[(s.colour, s.kind)] = popularity.get((s.colour, s.kind), 0) + 1
    names = []
    for i, sc in enumerate(imgs):
        name = f"COCO_val2014_{i + 1:012d}.jpg"
        sc.image().save(directory / "val2014" / name, quality=95)
        names.append(name)
    counts = {}
    for split in scenes.NEGATIVE_STRATEGIES:
        srng = random.Random(("pope", seed, split).__repr__())
        lines, qid = [], 1
        for sc, name in zip(imgs, names):
            present = list(dict.fromkeys((s.colour, s.kind) for s in sc.shapes))
            srng.shuffle(present)
            asked = set()
            pos = present[:3]
            neg = []
            for _ in range(30):
                if len(neg) == len(pos):
                    break
                pair = scenes.negative(sc, srng, split, popularity if split == "popular" else None)
                if pair is None or pair in asked:
                    pair = scenes.negative(sc, srng, "random")
                if pair not in asked:
                    asked.add(pair)
                    neg.append(pair)
            for (c, k), label in [*((p, "yes") for p in pos), *((p, "no") for p in neg)]:
                lines.append({"question_id": qid, "image": name, "text": f"Is there a {c} {k} in the image?",
                              "label": label})
                qid += 1
        with open(directory / f"coco_pope_{split}.json", "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)
        counts[split] = len(lines)
    return counts


# ---------------------------------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minivar.train", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", metavar="DIR", help="train a baby LLaVA and write its checkpoint here")
    what.add_argument("--eval", metavar="DIR", help="accuracy of the checkpoint in DIR on fresh held-out scenes")
    what.add_argument("--make-pope", metavar="DIR", help="write a POPE-format benchmark of held-out scenes")
    p.add_argument("--seed", type=int, default=0)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="train for this long (default 10)")
    budget.add_argument("--steps", type=int, help="train for this many steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n", type=int, default=40, help="--eval: questions per kind; --make-pope: images")
    p.add_argument("--var", action="store_true", help="--eval: with VAR on")
    args = p.parse_args(argv)
    try:
        if args.out:
            if args.seed < 0 or (args.steps is not None and args.steps < 1) or (args.minutes is not None and not args.minutes > 0):
                raise MinivarError("--seed must be ≥ 0, --steps ≥ 1 and --minutes > 0")
            minutes = args.minutes if args.steps is None and args.minutes else (None if args.steps else 10.0)
            rec = train(Path(args.out), seed=args.seed, minutes=minutes, steps=args.steps, batch_size=args.batch_size)
            print(f"trained {rec['steps']} steps in {rec['seconds']:.0f} s; final loss {rec['loss'][-1]:.3f}; "
                  f"checkpoint in {args.out}")
        elif args.eval:
            methods = None
            if args.var:
                from .methods.var import VARConfig, VAR
                methods = [VAR(VARConfig(find_sink_dims=True))]
            res = evaluate(args.eval, args.n, methods=methods)
            for k, v in res["accuracy"].items():
                print(f"{k:8s} {v:6.1%}  ({args.n} questions)")
        else:
            counts = make_pope(args.make_pope, args.n)
            print(f"wrote {', '.join(f'{k}: {v} questions' for k, v in counts.items())} in {args.make_pope}")
    except MinivarError as e:
        print(f"minivar: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
