"""The reference attention (minivar/models/attention.py) equals every speed path (attention_fast.py), fp32, in every
case LlamaAttention.attend sends to one: prefill, chunked prefill, decode with one and several rows, padding, a
shared prefix, values cached transposed or not, grouped-query attention, with and without hooks.

Each case runs twice through the whole model (tiny, random weights): as the decoder chooses, and with
LlamaAttention.attend replaced by the reference alone; logits and what the hooks saw must agree within 1e-5. The
paths each run took are recorded, so a case that silently stopped taking its speed path fails too.
"""
import contextlib

import pytest
import torch

from conftest import build_model, tiny_llava_config
from minivar.demo import random_state_dict
from minivar.errors import MinivarError
from minivar.methods.hooks import Hook
from minivar.models import attention_fast, llama
from minivar.models.attention import attention
from minivar.models.llama import KV, Cache, KVCache, SharedPrefixCache

FIRST = 6                  # the first position the probability-reading hooks need
TOL = 1e-5
HOOKS = ["none", "needs", "key_mask", "changes", "scores", "all"]


@pytest.fixture(scope="module", params=["mha", "gqa"])
def model(request):
    """A tiny Llava (2 layers, 4 heads); "gqa": 2 key/value heads shared by 2 query heads each."""
    cfg = tiny_llava_config(**({"num_key_value_heads": 2} if request.param == "gqa" else {}))
    return build_model(cfg, random_state_dict(cfg, seed=3, std=0.2))


# ---- hooks of each kind the protocol allows ----------------------------------------------------------------------

class NeedsRows(Hook):
    """Needs the probabilities from position FIRST on; keeps them, {(layer, position): [B, H, S]}."""

    def __init__(self):
        self.seen = {}

    def explicit_from(self, layer, rows):
        return FIRST if rows.stop > FIRST else None

    def probs(self, layer, probs, rows, before):
        for i, position in enumerate(rows):
            if position >= FIRST:
                self.seen[(layer, position)] = probs[:, :, i].clone()
        return probs


class ChangesProbs(NeedsRows):
    """From position FIRST on, halves each row's attention to key 0 and renormalises (then keeps the result)."""

    def probs(self, layer, probs, rows, before):
        weight = torch.ones(probs.shape[-1])
        weight[0] = 0.5
        changed = probs * weight
        changed = changed / changed.sum(-1, keepdim=True)
        later = (torch.arange(rows.start, rows.stop) >= FIRST)[None, None, :, None]
        return super().probs(layer, torch.where(later, changed, probs), rows, before)


class ChangesScores(NeedsRows):
    """From position FIRST on, the pre-softmax step: key 1's score a ← a + 0.5·|a| (PAI's form); keeps the scores
    it returns, {(layer, position): [B, H, S]}, and the probabilities after them (NeedsRows)."""

    def __init__(self):
        super().__init__()
        self.seen_scores = {}

    def scores(self, layer, scores, rows):
        later = (torch.arange(rows.start, rows.stop) >= FIRST)[None, None, :, None]
        column = (torch.arange(scores.shape[-1]) == 1)[None, None, None, :]
        scores = torch.where(later & column, scores + 0.5 * scores.abs(), scores)
        for i, position in enumerate(rows):
            if position >= FIRST:
                self.seen_scores[(layer, position)] = scores[:, :, i].clone()
        return scores


class DropsKey(Hook):
    """Removes key position 2 for every row but its own."""
    masks_keys = True

    def key_mask(self, layer, mask, rows):
        S = mask.shape[-1]
        drop = (torch.arange(S) == 2)[None, :] & (torch.arange(rows.start, rows.stop) != 2)[:, None]    # [T, S]
        return mask & ~drop


def make_hooks(kind):
    return {"none": [], "needs": [NeedsRows()], "key_mask": [DropsKey()], "changes": [ChangesProbs()],
            "scores": [ChangesScores()], "all": [DropsKey(), ChangesScores(), ChangesProbs(), NeedsRows()]}[kind]


def needs_rows(kind):
    return kind in ("needs", "changes", "scores", "all")


# ---- the two ways of running a case ------------------------------------------------------------------------------

def reference_attend(self, q, kv, mask, rows, hooks=None):
    """LlamaAttention.attend as the reference alone: a shared prefix becomes each sample's own first positions, and
    grouped key/value heads are repeated per query head (as the reference takes them)."""
    if kv.k.shape[1] != q.shape[1]:
        kv = llama.repeat_kv(kv, q.shape[1] // kv.k.shape[1])
    k, v = kv.k, kv.v
    if kv.prefix is not None:         # G prefixes, prefix g the first positions of the g-th group of samples
        n = q.shape[0] // kv.prefix[0].shape[0]
        k = torch.cat([kv.prefix[0].repeat_interleave(n, 0), k], dim=2)
        v = torch.cat([kv.prefix[1].repeat_interleave(n, 0), v], dim=2)
    return attention(q, k, v, mask, self.layer_idx, rows, hooks)


@contextlib.contextmanager
def recording_paths():
    """The speed paths that ran: fused, split (a hook needs some rows), one_row (matrix-vector form), prefix."""
    taken = set()

    def spy(name, real):
        def run(*args, **kwargs):
            if name == "written_out":
                prefix = kwargs.get("prefix", args[7] if len(args) > 7 else None)
                taken.add("prefix" if prefix is not None else "one_row")
            else:
                taken.add(name)
            return real(*args, **kwargs)
        return run

    with pytest.MonkeyPatch.context() as mp:
        for name in ("fused", "split", "written_out"):
            mp.setattr(attention_fast, name, spy(name, getattr(attention_fast, name)))
        yield taken


def assert_close(a, b, what, tol=TOL):
    assert a.shape == b.shape, what
    diff = (a - b).abs().max().item()
    assert diff <= tol, (what, diff)


def assert_same_run(case, model, kind, paths):
    """`case(model, hooks)` → a list of logits; equal with the speed paths (which must be `paths`) and with the
    reference alone, and the hooks saw the same probabilities."""
    fast_hooks, ref_hooks = make_hooks(kind), make_hooks(kind)
    with torch.inference_mode():
        with recording_paths() as taken:
            fast = case(model, fast_hooks)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(llama.LlamaAttention, "attend", reference_attend)
            ref = case(model, ref_hooks)
    assert taken == paths
    assert len(fast) == len(ref)
    for i, (a, b) in enumerate(zip(fast, ref)):
        assert_close(a, b, f"call {i}")
    for f, r in zip(fast_hooks, ref_hooks):
        if isinstance(f, NeedsRows):
            assert f.seen and f.seen.keys() == r.seen.keys()
            for key in f.seen:
                assert_close(f.seen[key], r.seen[key], key)
        if isinstance(f, ChangesScores):
            assert f.seen_scores and f.seen_scores.keys() == r.seen_scores.keys()
            for key in f.seen_scores:        # masked keys hold (1 − 0.5)·fp32 min on both paths: compare the rest
                a, b = f.seen_scores[key], r.seen_scores[key]
                assert torch.equal(a < -1e30, b < -1e30), key
                assert_close(a.clamp(min=-1e30), b.clamp(min=-1e30), key)


def tokens(B, T, seed):
    return torch.randint(3, 250, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- the cases ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", HOOKS)
@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
def test_prefill(model, kind, cached):
    def case(model, hooks):
        ids = tokens(2, 12, 0)
        cache = KVCache(model.config.text, 2, 12, torch.float32, "cpu") if cached else None
        return [model(ids, cache=cache, hooks=hooks)]
    assert_same_run(case, model, kind, {"split"} if needs_rows(kind) else {"fused"})


@pytest.mark.parametrize("kind", HOOKS)
def test_chunked_prefill(model, kind):
    """Calls from position 0, 5 (FIRST inside it: some rows fused, some written out) and 9 (all written out)."""
    def case(model, hooks):
        ids = tokens(2, 14, 1)
        cache = KVCache(model.config.text, 2, 14, torch.float32, "cpu")
        return [model(ids[:, a:b], cache=cache, input_pos=a, hooks=hooks) for a, b in ((0, 5), (5, 9), (9, 14))]
    assert_same_run(case, model, kind, {"fused", "split"} if needs_rows(kind) else {"fused"})


def decode_paths(kind, transposed):
    if needs_rows(kind):
        return {"split", "one_row"}          # a needed decode row is written out as matrix-vector products
    return {"fused", "one_row"}              # the prompt fused; a CPU decode row written out, either value layout


@pytest.mark.parametrize("kind", HOOKS)
@pytest.mark.parametrize("transposed", [False, True], ids=["values", "values-transposed"])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode(model, kind, transposed, batch):
    """A prompt of 9, then one row per call (several rows: a batch)."""
    def case(model, hooks):
        cache = KVCache(model.config.text, batch, 13, torch.float32, "cpu", values_transposed=transposed)
        out = [model(tokens(batch, 9, 2), cache=cache, hooks=hooks)]
        for position in range(9, 13):
            out.append(model(tokens(batch, 1, position), cache=cache, input_pos=position, hooks=hooks))
        return out
    assert_same_run(case, model, kind, decode_paths(kind, transposed))


@pytest.mark.parametrize("kind", HOOKS)
@pytest.mark.parametrize("transposed", [False, True], ids=["values", "values-transposed"])
def test_padding(model, kind, transposed):
    """Three left-padded prompts (10, 7 and 4 tokens), then decode steps with the mask growing."""
    def case(model, hooks):
        lengths, T = (10, 7, 4), 10
        ids = tokens(3, T, 4)
        mask = torch.arange(T)[None, :] >= torch.tensor([T - n for n in lengths])[:, None]            # [3, T]
        ids = ids.masked_fill(~mask, model.config.pad_token_id)
        cache = KVCache(model.config.text, 3, T + 3, torch.float32, "cpu", values_transposed=transposed)
        out = [model(ids, cache=cache, attention_mask=mask, hooks=hooks)]
        for position in range(T, T + 3):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], dim=1)
            out.append(model(tokens(3, 1, position), cache=cache, input_pos=position, attention_mask=mask,
                             hooks=hooks))
        return out
    assert_same_run(case, model, kind, decode_paths(kind, transposed))


P, OWN = 7, (5, 3, 2)          # the shared prefix; each sample's own tokens (the shorter ones padded after P)


def shared_case(shared: bool, prefix_transposed: bool, padded: bool):
    """P prefix tokens, then three samples' own tokens and three decode steps — on a SharedPrefixCache (the prefix
    stored once) or on a plain cache holding the prefix for every sample."""
    def case(model, hooks):
        own = OWN if padded else (max(OWN),) * 3
        Q = max(own)
        prefix_ids, own_ids = tokens(1, P, 5), tokens(3, Q, 6)
        mask = torch.ones(3, P + Q, dtype=torch.bool)
        for b, n in enumerate(own):                    # [prefix][padding][own tokens], as Pipeline.generate_many
            mask[b, P:P + Q - n] = False
        own_ids = own_ids.masked_fill(~mask[:, P:], model.config.pad_token_id)
        cfg = model.config.text
        if shared:
            prefix = KVCache(cfg, 1, P, torch.float32, "cpu", values_transposed=prefix_transposed)
            model(prefix_ids, cache=prefix, hooks=hooks)
            cache = SharedPrefixCache(prefix, P, KVCache(cfg, 3, Q + 3, torch.float32, "cpu"), cfg)
        else:
            cache = KVCache(cfg, 3, P + Q + 3, torch.float32, "cpu")
            model(prefix_ids.expand(3, P), cache=cache, hooks=hooks)
        out = [model(own_ids, cache=cache, input_pos=P, attention_mask=None if not padded else mask, hooks=hooks)]
        for position in range(P + Q, P + Q + 3):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], dim=1)
            out.append(model(tokens(3, 1, position), cache=cache, input_pos=position,
                             attention_mask=None if not padded else mask, hooks=hooks))
        return out
    return case


@pytest.mark.parametrize("kind", HOOKS)
@pytest.mark.parametrize("prefix_transposed", [False, True], ids=["values", "values-transposed"])
@pytest.mark.parametrize("padded", [False, True], ids=["same-length", "padded"])
def test_shared_prefix(model, kind, prefix_transposed, padded):
    """The prefix's keys and values as a second segment (across_samples) equal the reference on the same keys..."""
    # the prefix's own call (positions 0 … 6) writes out its last row, FIRST, as a matrix-vector product
    paths = {"split", "one_row", "prefix"} if needs_rows(kind) else {"fused", "prefix"}
    assert_same_run(shared_case(True, prefix_transposed, padded), model, kind, paths)


@pytest.mark.parametrize("kind", HOOKS)
@pytest.mark.parametrize("padded", [False, True], ids=["same-length", "padded"])
def test_shared_prefix_equals_a_plain_cache_holding_the_prefix(model, kind, padded):
    """... and a plain cache that holds the prefix for every sample: the same logits, the same probabilities."""
    shared_hooks, plain_hooks = make_hooks(kind), make_hooks(kind)
    with torch.inference_mode():
        shared = shared_case(True, False, padded)(model, shared_hooks)
        plain = shared_case(False, False, padded)(model, plain_hooks)
    for i, (a, b) in enumerate(zip(shared, plain)):
        assert_close(a, b, f"call {i}")
    for s, p in zip(shared_hooks, plain_hooks):
        if isinstance(s, NeedsRows):          # the own rows (the prefix ran as a batch of one on the shared cache)
            own = [key for key in p.seen if key[1] >= P]
            assert own and own == [key for key in s.seen if key[1] >= P]
            for key in own:
                assert_close(s.seen[key], p.seen[key], key)


P2 = 4                         # the second prefix's length (left-padded to P in its cache), as DAMRO's contrast prompt


def two_prefix_case(shared: bool, padded: bool, prefix_padded: bool):
    """Two prefixes (a contrastive call's branches: rows 0-2 read prefix 0, rows 3-5 prefix 1; the second shorter
    when prefix_padded, left-padded to P), then the six rows' own tokens and three decode steps — on a
    SharedPrefixCache of two prefixes, or on a plain cache holding each row's prefix."""
    def case(model, hooks):
        own = OWN if padded else (max(OWN),) * 3
        Q = max(own)
        prefix_ids, own_ids = tokens(2, P, 8), tokens(6, Q, 9)
        prefix_mask = torch.ones(2, P, dtype=torch.bool)
        if prefix_padded:
            prefix_mask[1, :P - P2] = False
            prefix_ids = prefix_ids.masked_fill(~prefix_mask, model.config.pad_token_id)
        mask = torch.ones(6, P + Q, dtype=torch.bool)
        mask[:, :P] = prefix_mask.repeat_interleave(3, 0)
        for b, n in enumerate(own * 2):                # [prefix][padding][own tokens], as Pipeline.generate_many
            mask[b, P:P + Q - n] = False
        own_ids = own_ids.masked_fill(~mask[:, P:], model.config.pad_token_id)
        masked = padded or prefix_padded
        cfg = model.config.text
        if shared:
            prefix = KVCache(cfg, 2, P, torch.float32, "cpu")
            model(prefix_ids, cache=prefix, attention_mask=prefix_mask if prefix_padded else None, hooks=hooks)
            cache = SharedPrefixCache(prefix, P, KVCache(cfg, 6, Q + 3, torch.float32, "cpu"), cfg)
        else:
            cache = KVCache(cfg, 6, P + Q + 3, torch.float32, "cpu")
            model(prefix_ids.repeat_interleave(3, 0), cache=cache, hooks=hooks,
                  attention_mask=mask[:, :P] if prefix_padded else None)
        out = [model(own_ids, cache=cache, input_pos=P, attention_mask=mask if masked else None, hooks=hooks)]
        for position in range(P + Q, P + Q + 3):
            mask = torch.cat([mask, torch.ones(6, 1, dtype=torch.bool)], dim=1)
            out.append(model(tokens(6, 1, position), cache=cache, input_pos=position,
                             attention_mask=mask if masked else None, hooks=hooks))
        return out
    return case


@pytest.mark.parametrize("kind", HOOKS)
@pytest.mark.parametrize("padded", [False, True], ids=["same-length", "padded"])
@pytest.mark.parametrize("prefix_padded", [False, True], ids=["equal-prefixes", "shorter-second-prefix"])
def test_two_prefixes(model, kind, padded, prefix_padded):
    """A prefix per branch (across_samples with G = 2) equals the reference on each row's own prefix, and a plain
    cache holding each row's prefix: the same logits, the same probabilities of the own rows."""
    # the prefixes' own call writes out its last row, FIRST, as a matrix-vector product (as test_shared_prefix)
    paths = {"split", "one_row", "prefix"} if needs_rows(kind) else {"fused", "prefix"}
    assert_same_run(two_prefix_case(True, padded, prefix_padded), model, kind, paths)
    shared_hooks, plain_hooks = make_hooks(kind), make_hooks(kind)
    with torch.inference_mode():
        shared = two_prefix_case(True, padded, prefix_padded)(model, shared_hooks)
        plain = two_prefix_case(False, padded, prefix_padded)(model, plain_hooks)
    for i, (a, b) in enumerate(zip(shared, plain)):
        assert_close(a, b, f"call {i}", tol=2 * TOL)      # two speed paths, each within TOL of the reference
    for s, p in zip(shared_hooks, plain_hooks):
        if isinstance(s, NeedsRows):
            own = [key for key in p.seen if key[1] >= P]
            assert own and own == [key for key in s.seen if key[1] >= P]
            for key in own:
                assert_close(s.seen[key], p.seen[key], key)


def test_across_samples_with_groups():
    """across_samples: G = 1 and G = 2 equal the broadcasting product of each row with its group's matrix."""
    a = torch.randn(6, 3, 2, 5)
    for G in (1, 2, 3):
        b = torch.randn(G, 3, 5, 4)
        expected = a @ b.repeat_interleave(6 // G, 0)
        assert torch.allclose(attention_fast.across_samples(a, b), expected, atol=1e-6)


def test_the_test_hooks_change_what_they_should(model):
    """The hooks above are not idle: the key mask and the probability change move the logits (the latter only
    from FIRST on); the reading hook changes nothing."""
    ids = tokens(1, 12, 7)
    with torch.inference_mode():
        plain = model(ids)
        read = model(ids, hooks=[NeedsRows()])
        changed = model(ids, hooks=[ChangesProbs()])
        dropped = model(ids, hooks=[DropsKey()])
    assert_close(read, plain, "a hook that only reads")
    assert torch.equal(read[:, :FIRST], plain[:, :FIRST])        # the rows it does not need: the same kernel, bits
    assert_close(changed[:, :FIRST], plain[:, :FIRST], "rows before FIRST")
    assert (changed[:, FIRST:] - plain[:, FIRST:]).abs().max() > 1e-3
    assert_close(dropped[:, :3], plain[:, :3], "rows up to key 2")
    assert (dropped[:, 3:] - plain[:, 3:]).abs().max() > 1e-3
    with torch.inference_mode():
        rescored = model(ids, hooks=[ChangesScores()])
    assert torch.equal(rescored[:, :FIRST], plain[:, :FIRST])
    assert (rescored[:, FIRST:] - plain[:, FIRST:]).abs().max() > 1e-3


class ScoresOneRow(Hook):
    """The pre-softmax step on one row only (position ROW): every score of that row doubled."""

    def __init__(self, row):
        self.row = row

    def explicit_from(self, layer, rows):
        return self.row if rows.start <= self.row < rows.stop else None

    def scores(self, layer, scores, rows):
        i = self.row - rows.start
        if 0 <= i < scores.shape[2]:
            scores = scores.clone()
            scores[:, :, i] = scores[:, :, i] * 2
        return scores


@pytest.mark.parametrize("path", ["reference", "split", "written_out"])
def test_a_scores_hook_changes_exactly_its_row(path):
    """attention() with a scores hook that changes row ROW: that row's output moves, every other row's is the
    same bits; the split path (fused rows before it, the rest written out) and the one-row path agree with it."""
    g = torch.Generator().manual_seed(0)
    B, H, T, hd, ROW = 2, 3, 9, 8, 6
    q, k, v = (torch.randn(B, H, T, hd, generator=g) for _ in range(3))
    plain = attention(q, k, v, None, 0, range(T))
    changed = attention(q, k, v, None, 0, range(T), ScoresOneRow(ROW))
    moved = (changed - plain).abs().amax(dim=(0, 1, 3))                       # [T]
    assert moved[ROW] > 1e-3 and torch.equal(moved[torch.arange(T) != ROW], torch.zeros(T - 1))
    if path == "split":
        got = attention_fast.split(q, k, v, None, 0, range(T), ROW, ScoresOneRow(ROW))
        assert_close(got, changed, "split")
    elif path == "written_out":          # the last row alone, as a decode step: its scores hook changes it too
        last = ScoresOneRow(T - 1)
        want = attention(q, k, v, None, 0, range(T), last)[:, :, -1:]
        got = attention_fast.written_out(q[:, :, -1:], k, v, None, 0, range(T - 1, T), last)
        assert_close(got, want, "written_out")
        assert (got - plain[:, :, -1:]).abs().max() > 1e-3


# ---- the cache contract ------------------------------------------------------------------------------------------

def test_caches_keep_one_contract(model):
    cfg = model.config.text
    plain = KVCache(cfg, 2, 8, torch.float32, "cpu", values_transposed=True)
    shared = SharedPrefixCache(KVCache(cfg, 1, 3, torch.float32, "cpu"), 3, KVCache(cfg, 2, 5, torch.float32, "cpu"),
                               cfg)
    assert isinstance(plain, Cache) and isinstance(shared, Cache) and not isinstance(shared, KVCache)
    assert plain.max_len == 8 and shared.max_len == 8
    H, hd = cfg.n_kv_heads, cfg.head_dim
    k, v = torch.randn(2, H, 4, hd), torch.randn(2, H, 4, hd)
    first = plain.update(0, k, v, 0)
    assert isinstance(first, KV) and first.prefix is None and torch.equal(first.k, k) and torch.equal(first.v, v)
    later = plain.update(0, k[:, :, :1], v[:, :, :1], 4)        # positions 0 … 4, values as a transposed view
    assert later.values_transposed and later.k.shape == later.v.shape == (2, H, 5, hd)
    assert torch.equal(later.v[:, :, :4], v) and torch.equal(later.v[:, :, 4:], v[:, :, :1])
    shared.prefix.update(0, k[:1, :, :3], v[:1, :, :3], 0)
    got = shared.update(0, k[:, :, :2], v[:, :, :2], 3)          # own positions 3, 4
    assert torch.equal(got.k, k[:, :, :2]) and torch.equal(got.prefix[0], k[:1, :, :3])
    assert torch.equal(got.prefix[1], v[:1, :, :3])
    with pytest.raises(MinivarError, match="of 2 prefixes needs a multiple of 2 samples, got 3"):
        SharedPrefixCache(KVCache(cfg, 2, 3, torch.float32, "cpu"), 3, KVCache(cfg, 3, 5, torch.float32, "cpu"), cfg)
    with pytest.raises(MinivarError, match="writes from position 3 on, not 2"):
        shared.update(0, k[:, :, :1], v[:, :, :1], 2)
    positions = torch.arange(8).expand(2, 8)
    cos, sin = shared.rope(positions, range(0, 8))
    assert torch.equal(cos, plain.rope(positions, range(0, 8))[0]) and cos.shape == (2, 8, hd)
    for cache in (plain, shared):
        with pytest.raises(MinivarError, match="KV cache full: position 8 is past its 8 positions"):
            cache.rope(positions[:, :1], range(8, 9))

