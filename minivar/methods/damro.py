"""DAMRO (Gong et al., EMNLP 2024: "DAMRO: Dive into the Attention Mechanism of LVLM to Reduce Object
Hallucination"), as its released code computes it (github.com/coder-gx/DAMRO at 03008ac; docs/damro.md lists
every place where minivar and the released code part ways).

  1. outliers   in the vision-encoder layer whose output LLaVA reads (vision_feature_layer −2: CLIP layer 22 of 24,
                whose input is hidden_states[22]), the q_proj / k_proj outputs q, k [B, 577, C] over all tokens,
                full width C (no head split): attn = softmax(q kᵀ · C^−½); cls = attn[:, 0, 1:] [B, 576];
                outliers = topk(cls, k) — patch indices 0..575, in the order topk returns them (descending).
  2. contrast   the same prompt with the image replaced by the k projected features of the outliers, in that order
                (k image tokens instead of 576, positions contiguous), its own KV cache, fed the same tokens.
  3. each step  contrastive.combine: cutoff = log β + max l_full; l = (1+α) l_full − α l_contrast; −∞ below the
                cutoff; then the token choice (the released scripts sample: softmax, multinomial, seed 42).

Everything here is a plain function of the model's modules and tensors: the tower runs once (`outlier_image`), the
outlier scores are recomputed from the layer's input (its layer_norm1 and two projections, ~1 % of the tower's
work) instead of hooking the model, and nothing is stored on the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import MinivarError
from ..models.config import VisionConfig
from ..models.images import ImageInput, Panel
from ..models.internvl.config import InternVisionConfig
from .contrastive import ContrastiveRun, call_rows, check_alpha_beta, left_pad  # noqa: F401  (left_pad: for callers)
from .method import Branch, Method

# The released scripts' settings (scrpits/run_generation.sh): POPE with InstructBLIP, CHAIR, MME and the
# GPT-4V-aided evaluation with LLaVA-1.5.
PRESETS = {
    "pope": {"alpha": 0.5, "topk": 4, "beta": 0.1},
    "chair": {"alpha": 1.5, "topk": 4, "beta": 0.1},
    "mme": {"alpha": 2.0, "topk": 10, "beta": 0.1},
}


@dataclass(frozen=True)
class DAMROConfig:
    """DAMRO's three settings. The defaults are the released scripts' argparse defaults (= the mme preset)."""
    alpha: float = 2.0      # contrast strength: l = (1+α) l_full − α l_contrast
    beta: float = 0.1       # plausibility cutoff: tokens with p_full < β · max p_full are dropped
    topk: int = 10          # outlier tokens kept as the contrast image

    @staticmethod
    def preset(name: str, **overrides) -> "DAMROConfig":
        """A released setting by name (pope, chair, mme); values given explicitly (not None) win."""
        if name not in PRESETS:
            raise MinivarError(f"`DAMROConfig.preset` name '{name}' is not one of {', '.join(PRESETS)}")
        return DAMROConfig(**(PRESETS[name] | {k: v for k, v in overrides.items() if v is not None}))

    def validate(self, model_config=None) -> "DAMROConfig":
        """Ranges, and (given the model's config) that the family has a CLS token and enough patches."""
        check_alpha_beta(self.alpha, self.beta, "DAMROConfig")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise MinivarError(f"`DAMROConfig.topk` must be an integer ≥ 1, got {self.topk!r}")
        if model_config is not None:
            n = patch_count(model_config)
            if self.topk > n:
                raise MinivarError(f"`DAMROConfig.topk` is {self.topk}, more than the {n} image patches of the model")
        return self

    def settings(self) -> dict:
        return {"alpha": float(self.alpha), "beta": float(self.beta), "topk": int(self.topk)}


def patch_count(model_config) -> int:
    """The number of patch tokens DAMRO chooses among (per tile); refuses a family whose vision encoder has no CLS
    token (the outlier score is the CLS token's attention row) or whose feature layer is not one int."""
    vision = getattr(model_config, "vision", None)
    if isinstance(vision, InternVisionConfig):     # InternViT: 1 CLS + 32² patches per tile
        outlier_layer(model_config)
        return vision.grid ** 2
    if not isinstance(vision, VisionConfig):       # minivar's VisionConfig is CLIP's: 1 CLS + N patch tokens
        from ..models.registry import family_of
        name = family_of(model_config).name if hasattr(model_config, "model_type") else "this model"
        raise MinivarError(f"--damro: DAMRO needs a vision encoder with a CLS token (CLIP); {name}'s has none "
                           f"(VCD, --vcd, works on it)")
    outlier_layer(model_config)
    return vision.num_patches


def outlier_layer(model_config) -> int:
    """The CLIP layer whose q/k the released hooks read: `encoder.layers[vision_feature_layer]` of the full stack —
    for −2 layer L−2 (22 of 24), whose *output* is hidden_states[−2], the features LLaVA uses; its input is
    hidden_states[L−2]. (For a non-negative feature layer v the released hooks would read layer v, whose output is
    hidden_states[v+1], a layer LLaVA never runs: refused.)"""
    v = model_config.vision_feature_layer
    if isinstance(v, bool) or not isinstance(v, int):
        raise MinivarError(f"DAMRO needs a single vision feature layer (the released code hooks one layer), "
                           f"this model reads {v}")
    n = model_config.vision.num_hidden_layers
    if not -n <= v < 0:
        raise MinivarError(f"DAMRO hooks CLIP layer vision_feature_layer={v}, whose output LLaVA does not read "
                           f"(the released code assumes a negative feature layer)")
    return n + v


def tower_layers(model) -> list:
    """The vision tower's layers: CLIP's `encoder.layers`, InternViT's `encoder.layer` (their hub names)."""
    encoder = model.vision_tower.encoder
    return encoder.layers if hasattr(encoder, "layers") else encoder.layer


def layer_parts(layer) -> tuple:
    """(the norm before attention, the attention module) of a CLIP or an InternViT layer."""
    return (layer.layer_norm1, layer.self_attn) if hasattr(layer, "self_attn") else \
        (layer.layernorm_before, layer.attention)


def cls_attention(layer, layer_input: torch.Tensor) -> torch.Tensor:
    """DAMRO's outlier score of one vision layer: the CLS row of softmax(q kᵀ · C^−½) over the full width (no head
    split), without the CLS column — [B, N] fp32 for the layer's input [B, 1+N, C] (hidden_states[layer]). q and k
    are the q_proj / k_proj outputs, the modules the released hooks read (InternViT-6B's q/k norm comes after)."""
    norm, attn = layer_parts(layer)
    x = norm(layer_input)
    q, k = attn.q_proj(x).float(), attn.k_proj(x).float()                       # [B, 1+N, C] each
    C = q.shape[-1]
    # the whole [1+N, 1+N] product, as released (row 0 alone would be the same numbers up to the kernels' rounding,
    # and the top-k order of near-ties must not depend on that)
    attn = F.softmax((q @ k.transpose(-2, -1)) * C ** -0.5, dim=-1)               # [B, 1+N, 1+N]
    return attn[:, 0, 1:]


def head_cls_attention(layer, layer_input: torch.Tensor) -> torch.Tensor:
    """The layer's own multi-head attention of the CLS token to the patches: [B, H, N] fp32 (what the layer
    actually computes; DAMRO's score is `cls_attention`)."""
    norm, attn_mod = layer_parts(layer)
    x = norm(layer_input)
    B, T, _ = x.shape
    qk = attn_mod.qk(x) if hasattr(attn_mod, "qk") else (attn_mod.q_proj(x), attn_mod.k_proj(x))   # InternViT: normed
    q, k = (t.float().view(B, T, attn_mod.n_heads, attn_mod.head_dim).transpose(1, 2) for t in qk)   # [B, H, T, hd]
    attn = F.softmax((q[:, :, :1] @ k.transpose(-2, -1)) * attn_mod.head_dim ** -0.5, dim=-1)   # [B, H, 1, T]
    return attn[:, :, 0, 1:]


@torch.inference_mode()
def vision_cls_attention(model, pixel_values: torch.Tensor, layers=None, heads: bool = False) -> dict[int, torch.Tensor]:
    """The vision tower's CLS attention per layer, for pictures and the capture API: {layer: [B, N]} (DAMRO's
    full-width score) or with heads=True {layer: [B, H, N]} (the layer's real heads). layers: CLIP layer indices
    (default: every layer minivar runs)."""
    hidden_states = model.vision_tower(pixel_values)
    held = len(tower_layers(model))
    layers = range(held) if layers is None else layers
    out = {}
    for i in layers:
        if not 0 <= i < held:
            raise MinivarError(f"vision layer {i} is outside the {held} vision layers this model runs")
        layer = tower_layers(model)[i]
        out[i] = (head_cls_attention if heads else cls_attention)(layer, hidden_states[i])
    return out


@dataclass
class OutlierImage:
    """One vision-tower run read twice: the full branch's image features and DAMRO's contrast image."""
    features: list[torch.Tensor]          # one [N, D_text] per image: exactly Llava.image_features(images)
    outlier_features: list[torch.Tensor]  # one [k, D_text] per image: projector(unprojected features, topk order)
    outliers: torch.Tensor                # [B, k] patch indices 0..N−1, descending score
    scores: torch.Tensor = field(repr=False, default=None)   # [B, N] the CLS attention they were chosen by


@torch.inference_mode()
def outlier_image(model, images, topk: int) -> OutlierImage:
    """Run the vision tower once over `images` (pixels [B, 3, S, S] or a list of ImageInput); return the projected
    features LLaVA uses, DAMRO's outliers and their projected features. `model` is a minivar Llava (anything with
    vision_tower, multi_modal_projector and a LlavaConfig)."""
    cfg = model.config
    n_patches = patch_count(cfg)
    if not 1 <= topk <= n_patches:
        raise MinivarError(f"`DAMROConfig.topk` is {topk}, outside 1..{n_patches} (the model's image patches)")
    L = outlier_layer(cfg)
    pixel_values = images if isinstance(images, torch.Tensor) else torch.stack([im.pixel_values for im in images])
    hidden_states = model.vision_tower(pixel_values)
    scores = cls_attention(model.vision_tower.encoder.layers[L], hidden_states[L])      # [B, N]
    _, idx = torch.topk(scores, topk, dim=1, largest=True)                             # sorted: descending
    # the features as Llava.image_features picks them: hidden_states[v] of the full stack (index v mod L+1)
    selected = hidden_states[cfg.vision_feature_layer % (cfg.vision.num_hidden_layers + 1)]
    if cfg.vision_feature_select_strategy == "default":
        selected = selected[:, 1:]    # [B, N, C]; with "full" the released gather indexes the 1+N rows (CLS first)
    C = selected.shape[-1]
    gathered = torch.gather(selected, 1, idx[..., None].expand(-1, -1, C))            # [B, k, C]
    proj = model.multi_modal_projector
    dtype = proj.linear_1.weight.dtype
    return OutlierImage(list(proj(selected.to(dtype))), list(proj(gathered.to(dtype))), idx, scores)


@torch.inference_mode()
def internvl_outliers(model, images, topk: int) -> tuple[list, list, list]:
    """InternVL: one tower run over every tile of every image (ImageInputs); the top-k is taken per tile, each
    tile's own CLS row at the layer the feature layer names (−1: the last), as DAMRO's LLaVA-NeXT code does per
    crop. Of each image only the whole-image view's outliers make the contrast image — the thumbnail (the last
    tile) when the image is tiled, its one tile otherwise — as NeXT keeps its base image's. The projector reads
    pixel-shuffled tokens (2×2 patches each), so the contrast image is the tokens holding the outlier patches, in
    top-k order, each once (k patches give at most k tokens).
    Returns (full features [tiles·256, D] per image, contrast features [≤k, D] per image, the view's outlier
    patches [k] per image, 0 … 1023 row-major)."""
    cfg = model.config
    L = outlier_layer(cfg)
    pixel_values = torch.cat([im.pixel_values for im in images])
    patches, hidden_states = model.patch_features(pixel_values, keep=(L,))
    scores = cls_attention(tower_layers(model)[L], hidden_states[L])                 # [tiles, N]
    _, idx = torch.topk(scores, topk, dim=1, largest=True)                            # per tile, descending
    tokens = model.project(patches)                                                   # [tiles, 256, D]
    g, s = cfg.vision.grid, cfg.shuffle
    full, contrast, found, first = [], [], [], 0
    for im in images:
        n = im.pixel_values.shape[0]
        view = first + n - 1                                       # the thumbnail, or the only tile
        patch = idx[view]
        token = (patch // g // s) * (g // s) + (patch % g) // s    # the pixel-shuffled token over each patch
        kept = list(dict.fromkeys(token.tolist()))
        full.append(tokens[first:first + n].reshape(-1, tokens.shape[-1]))
        contrast.append(tokens[view, kept])
        found.append(patch)
        first += n
    return full, contrast, found


def contrast_image(pixel_values: torch.Tensor, outliers: torch.Tensor) -> ImageInput:
    """The contrast image of one sample as an ImageInput: k tokens in one row, in topk order (the pictures and
    VAR's image span read the layout; meta["outliers"] holds the patch indices they come from)."""
    k = int(outliers.numel())
    return ImageInput(pixel_values, k, (Panel("outliers", 1, k),), {"outliers": outliers.tolist()})


def contrast_rows(rows: list[list[int]], image_token_index: int, n_image_tokens: int) -> list[list[int]]:
    """Each prompt (unpadded ids) with its run of image tokens shortened to `n_image_tokens` (k for LLaVA-1.5,
    k + 1 for LLaVA-NeXT): the text around it unchanged, so the contrast prompt is the same prompt."""
    out = []
    for b, row in enumerate(rows):
        spots = [i for i, t in enumerate(row) if t == image_token_index]
        if not spots or spots != list(range(spots[0], spots[0] + len(spots))):
            raise MinivarError(f"DAMRO: prompt {b} must hold one contiguous run of image tokens")
        if len(spots) < n_image_tokens:
            raise MinivarError(f"DAMRO: prompt {b} has {len(spots)} image tokens, fewer than the {n_image_tokens} kept")
        out.append(row[:spots[0]] + [image_token_index] * n_image_tokens + row[spots[-1] + 1:])
    return out


def next_contrast_features(tile_outlier_features: torch.Tensor, image_newline: torch.Tensor) -> torch.Tensor:
    """LLaVA-NeXT's contrast image, as released (`pack_image_features_damro`): of one image's tiles' outlier
    features [n_tiles, k, D] (top-k taken per tile, the base image first) only the first tile's k, then one
    `image_newline` [D] — [k + 1, D]. The other tiles' outliers are computed and dropped by the released code."""
    if tile_outlier_features.ndim != 3:
        raise MinivarError(f"LLaVA-NeXT outlier features must be [tiles, k, D], got {tuple(tile_outlier_features.shape)}")
    first = tile_outlier_features[0]
    return torch.cat([first, image_newline[None].to(first.device, first.dtype)], dim=0)


class DAMRO(Method):
    """DAMRO on minivar's generation: the contrast branch (k outlier tokens as the image) runs as rows of the same
    batched forward as the full prompts; the token choice is contrastive.combine."""
    name = "damro"
    adds_branch = True

    def __init__(self, config: DAMROConfig | None = None):
        self.config = DAMROConfig() if config is None else config

    def settings(self) -> dict:
        return self.config.settings()

    def check(self, pipeline) -> None:
        self.config.validate(pipeline.config)

    def branch(self, call) -> list[Branch]:
        model, k = call.model, self.config.topk
        self.config.validate(model.config)
        if getattr(model.config, "model_type", None) == "internvl":
            full, contrast, found = internvl_outliers(model, call.images, k)
            call.features = full
            call.shared["damro"] = found
            rows = [contrast_rows([r], model.config.image_token_index, len(c))[0]
                    for r, c in zip(call_rows(call), contrast)]
            return [Branch(r, f) for r, f in zip(rows, contrast)]
        if hasattr(model, "image_newline"):
            # LLaVA-NeXT as released: top-k per crop (each crop's own CLS row), the contrast image the base crop's k
            # features + one image_newline; the full features packed from the same tower run (the family's pack)
            full, contrast, found = [], [], []
            for im in call.images:
                out = outlier_image(model, im.pixel_values, k)             # the image's crops as the batch
                full.append(model.pack(torch.stack(out.features), tuple(im.meta["image_size"])))
                contrast.append(next_contrast_features(torch.stack(out.outlier_features), model.image_newline))
                found.append(out.outliers[0])
            n_tokens = k + 1
        else:
            # one tower run gives both branches' images
            out = outlier_image(model, call.images, k)
            full, contrast, found, n_tokens = out.features, out.outlier_features, list(out.outliers), k
        call.features = full                     # the full branch's features: not computed again
        call.shared["damro"] = found
        rows = contrast_rows(call_rows(call), model.config.image_token_index, n_tokens)
        return [Branch(r, f) for r, f in zip(rows, contrast)]

    def start(self, call) -> "DAMRORun":
        found = call.shared.get("damro")
        if found is not None and len(found) == 1 < call.samples:
            found = found * call.samples      # generate_many: one image, its branch made once for every question
        return DAMRORun(self.config, found, keep_candidates=call.capture)


class DAMRORun(ContrastiveRun):
    """One call's DAMRO: the combination rule, and each sample's outliers for its report."""

    def __init__(self, config: DAMROConfig, outliers: list[torch.Tensor] | None, keep_candidates: bool = False):
        super().__init__(config.alpha, config.beta, "DAMRO", keep_candidates)
        self.config, self.outliers = config, outliers       # per sample [k] (LLaVA-NeXT: the base crop's)

    def report(self, b: int, generated_rows: int) -> dict:
        found = None if self.outliers is None else self.outliers[b].tolist()
        return {"outliers": found} | self.config.settings()


def outlier_sink_overlap(outliers: list[int], var_report: dict) -> dict:
    """DAMRO's ViT outliers next to VAR's visual sinks of the same sample (the question "are the LLM's visual sinks
    the ViT's high-attention outliers?"): both as patch indices (a sink's prompt position minus the image span's
    start: LLaVA-1.5's image tokens are its patches in order; LLaVA-NeXT's first P² are the base crop's, where its
    outliers are), the overlap over all layers and per layer. var_report: VAR's report (Result.reports["var"])."""
    start = int(var_report["image_span"][0])
    chosen = set(int(i) for i in outliers)
    per_layer = {layer: sorted(chosen & {p - start for p in positions})
                 for layer, positions in var_report["visual_sinks"].items()}
    sinks = sorted({p - start for positions in var_report["visual_sinks"].values() for p in positions})
    both = sorted(chosen & set(sinks))
    return {"outliers": list(outliers), "visual_sink_patches": sinks, "overlap": both, "count": len(both),
            "per_layer": {layer: len(v) for layer, v in per_layer.items()}}


# The command lines' options (argparse dests), for flags.py: --damro [--damro-alpha A] [--damro-beta B]
# [--damro-topk K] [--damro-preset pope|chair|mme].
OPTIONS = ("damro_alpha", "damro_beta", "damro_topk", "damro_preset")
_FIELDS = {"alpha": "damro_alpha", "beta": "damro_beta", "topk": "damro_topk", "preset": "damro_preset"}


def from_options(opts: dict, spell) -> DAMRO | None:
    """The DAMRO method the options ask for (None without `damro`); ranges checked now, before the model loads (k
    against the patch count: Method.check, after). spell(dest) → how the caller writes an option in errors."""
    given = {k: v for k, v in opts.items() if v is not None and v is not False}
    if not given.get("damro"):
        stray = [k for k in OPTIONS if k in given]
        if stray:
            raise MinivarError(f"{spell(stray[0])} only applies with {spell('damro')}")
        return None
    try:
        overrides = {"alpha": given.get("damro_alpha"), "beta": given.get("damro_beta"), "topk": given.get("damro_topk")}
        preset = given.get("damro_preset")
        cfg = DAMROConfig.preset(preset, **overrides) if preset is not None else \
            DAMROConfig(**{k: v for k, v in overrides.items() if v is not None})
        return DAMRO(cfg.validate())
    except MinivarError as e:                         # `DAMROConfig.topk` → the caller's spelling of its option
        message = str(e)
        for field, dest in _FIELDS.items():
            message = message.replace(f"`DAMROConfig.{field}`", spell(dest))
        raise MinivarError(message) from None
