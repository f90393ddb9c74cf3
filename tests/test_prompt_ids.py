"""Prompt ids as each released code feeds them: `--prompt-tokenization damro` (DAMRO's scripts: llava-hf's slow
LlamaTokenizer, legacy=False) and `official` (VAR's code: its segments through LLaVA's slow tokenizer, typed special
tokens included), held against the slow tokenizer's rule re-stated below loop by loop on the real LLaMA
tokenizer.json (../shared; skipped without it), and against transformers' own LlamaTokenizer(legacy=False). Then
`damro` through every door: the API, the command line, `minivar-eval run` (run.json, resume), the lmms-eval plugin
and `reproduce damro`."""
import json

import pytest

from conftest import assert_one_line_error, run_cli
from minivar import processing
from minivar.errors import MinivarError

IMAGE_ID, PAD_ID, SPACE = 32000, 32001, 29871
LLAMA_SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2}                        # sentencepiece's control tokens
LLAVA_HF_SPECIALS = LLAMA_SPECIALS | {"<image>": IMAGE_ID, "<pad>": PAD_ID}  # llava-hf's tokenizer adds these
HUMAN = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
         "detailed, and polite answers to the human's questions.")
USER = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions.")
# DAMRO's utils/conversation.py conv_llava_v1 (SeparatorStyle.TWO, sep " "): "<image>\n" + question, one user turn;
# LLaVA's vicuna_v1 the same with "user"; llava-hf's model card's without a system line
TEMPLATES = {"llava_v1": HUMAN + " USER: <image>\n{q} ASSISTANT:", "vicuna_v1": USER + " USER: <image>\n{q} ASSISTANT:",
             "llava_hf": "USER: <image>\n{q} ASSISTANT:"}
QUESTIONS = ["What is in the image?",                                     # plain
             "Is the <image> tag here?",                                  # spells the image placeholder
             "Stop</s>here, and </s> there.",                            # spells EOS, glued and spaced
             "Count 2 日本 café — naïve ✓?",                              # non-ASCII, digits
             "<s>Begin <unk> end ▁ok"]                                    # BOS, UNK, a typed "▁"


# ---------------------------------------------------------------------------------------------------------------
# The slow tokenizer, re-stated (transformers 4.43: LlamaTokenizer.tokenize/_tokenize with legacy=False,
# PreTrainedTokenizer.tokenize; the sentencepiece model = the tokenizer.json's BPE model with its vocab and merges)

@pytest.fixture(scope="module")
def sentencepiece(llama_tokenizer_path):
    return sentencepiece_encoder(llama_tokenizer_path)


def sentencepiece_encoder(llama_tokenizer_path):
    """The sentencepiece model's encoder, without the dummy prefix legacy=False turns off: whitespace is "▁"."""
    from tokenizers import Tokenizer, models
    spec = json.loads(llama_tokenizer_path.read_text())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    bpe = Tokenizer(models.BPE(vocab=spec["vocab"], merges=merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    return lambda text: bpe.encode(text.replace(" ", "▁"), add_special_tokens=False).ids


def slow_tokenize(sp, text: str, specials: dict[str, int], add_special_tokens: bool = False) -> list[int]:
    # LlamaTokenizer.tokenize (legacy=False): "▁" → " ", then one "▁" in front (add_prefix_space)
    text = "▁" + text.replace("▁", " ")
    # PreTrainedTokenizer.tokenize: cut at the added tokens (tokens_trie.split: leftmost, then longest); none of
    # LLaMA's has lstrip / rstrip / single_word, so nothing around them is stripped
    pieces, start, i = [], 0, 0
    while i < len(text):
        match = None
        for token in specials:
            if text.startswith(token, i) and (match is None or len(token) > len(match)):
                match = token
        if match is None:
            i += 1
            continue
        if start < i:
            pieces.append(text[start:i])
        pieces.append(match)
        i += len(match)
        start = i
    if start < len(text):
        pieces.append(text[start:])
    ids = []
    for piece in pieces:
        if piece in specials:
            ids.append(specials[piece])
        elif not piece.startswith(("▁", " ")):
            ids += sp(piece)                                   # _tokenize: sentencepiece, no dummy prefix
        else:                                                  # _tokenize's "<unk>" prefix, then cut it off
            unk_length = len(sp("<unk>"))
            ids += sp("<unk>" + piece)[unk_length:]
    # LlamaTokenizer.tokenize: a text that starts with a special token drops the "▁" put before it
    if len(ids) > 1 and ids[0] == SPACE and ids[1] in specials.values():
        ids = ids[1:]
    return ([1] if add_special_tokens else []) + ids       # build_inputs_with_special_tokens: BOS, no EOS


def expand(ids, n):
    at = ids.index(IMAGE_ID)
    return ids[:at] + [IMAGE_ID] * n + ids[at + 1:]


@pytest.fixture(scope="module")
def tok(llama_tokenizer_path):
    return processing.Tokenizer(llama_tokenizer_path, IMAGE_ID)


# ---------------------------------------------------------------------------------------------------------------
# damro: DAMRO's released scripts

@pytest.mark.parametrize("conv_mode", sorted(TEMPLATES))
@pytest.mark.parametrize("question", QUESTIONS)
def test_damro_ids_are_the_slow_tokenizers(tok, sentencepiece, question, conv_mode):
    ref = slow_tokenize(sentencepiece, TEMPLATES[conv_mode].replace("{q}", question), LLAVA_HF_SPECIALS,
                        add_special_tokens=True)
    if ref.count(IMAGE_ID) == 2:          # the question's "<image>" is a second image token: the released code fails
        with pytest.raises(MinivarError, match="spells '<image>'.*second image token"):
            processing.damro_prompt_ids(tok, question, conv_mode, 5, IMAGE_ID)
        assert "<image>" in question
        return
    got = processing.damro_prompt_ids(tok, question, conv_mode, 5, IMAGE_ID)
    assert got == expand(ref, 5)
    assert got[0] == 1 and got.count(IMAGE_ID) == 5
    llava = tok.encode_prompt(question, conv_mode, 5)
    assert got != llava                                           # at least the "▁" after the image differs
    at = got.index(IMAGE_ID) + 5
    assert got[at] == 13 and llava[at:at + 2] == [SPACE, 13]        # "\n" right after the image: no "▁" before it


def test_damro_ids_of_the_issue_and_typed_specials(tok):
    got = processing.damro_prompt_ids(tok, "What is this?", "llava_v1", 1, IMAGE_ID)
    llava = tok.encode_prompt("What is this?", "llava_v1", 1)
    at = got.index(IMAGE_ID)
    assert got[at - 1:at + 3] == [SPACE, IMAGE_ID, 13, 5618]
    assert llava[at - 1:at + 4] == [SPACE, IMAGE_ID, SPACE, 13, 5618]
    eos = processing.damro_prompt_ids(tok, "Stop</s>here, and </s> there.", "llava_v1", 1, IMAGE_ID)
    assert eos.count(2) == 2 and tok.encode_prompt("Stop</s>here, and </s> there.", "llava_v1", 1).count(2) == 0


def test_the_restated_rule_is_transformers_slow_rule(sentencepiece, llama_tokenizer_path):
    """The re-statement above against transformers' own LlamaTokenizer(legacy=False) built on the same vocabulary
    (its tokenizers-backed form: the same ids for texts that do not start with a space)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import AddedToken
    spec = json.loads(llama_tokenizer_path.read_text())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    ref = transformers.LlamaTokenizer(vocab=spec["vocab"], merges=merges, legacy=False)
    ref.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True, normalized=False)
                                                          for t in ("<image>", "<pad>")]})
    assert ref.convert_tokens_to_ids(["<image>", "<pad>"]) == [IMAGE_ID, PAD_ID]
    for question in QUESTIONS:
        for template in TEMPLATES.values():
            text = template.replace("{q}", question)
            assert slow_tokenize(sentencepiece, text, LLAVA_HF_SPECIALS) == \
                ref(text, add_special_tokens=False).input_ids, text


def test_damro_refuses_templates_it_has_no_rule_for(tok):
    with pytest.raises(MinivarError, match="damro tokenizes LLaVA's LLaMA templates"):
        processing.damro_prompt_ids(tok, "What?", "mistral_instruct", 1, IMAGE_ID)


# ---------------------------------------------------------------------------------------------------------------
# official: VAR's released code (its segments through the same slow tokenizer, LLaVA's own: no "<image>" token)

def segment_prompt(sp, question: str, n: int) -> list[int]:
    """src/stash.py MetadataStation.segment_prompt on conv_vicuna_v1's prompt, each segment through the slow
    tokenizer (add_special_tokens=False), every 29871 after the first dropped."""
    prompt = TEMPLATES["vicuna_v1"].replace("{q}", question)
    system, rest = prompt.split("USER", 1)
    user, *assistant = ("USER" + rest).split("ASSISTANT", 1)
    role_1 = "ASSISTANT" + assistant[0] if assistant else ""
    role_0, inst_q = user.split("<image>", 1)
    ids, first = [], False
    for text in (system, role_0, None, inst_q, role_1):
        if text is None:
            ids += [IMAGE_ID] * n
            continue
        for t in slow_tokenize(sp, text, LLAMA_SPECIALS):
            if t != SPACE or not first:
                ids.append(t)
                first = first or t == SPACE
    return ids


@pytest.mark.parametrize("question", QUESTIONS)
def test_official_ids_are_the_released_segments_through_the_slow_tokenizer(tok, sentencepiece, question):
    got = processing.official_prompt_ids(tok, question, 3, IMAGE_ID)
    assert got == segment_prompt(sentencepiece, question, 3)
    assert got.count(IMAGE_ID) == 3                                   # a typed "<image>" stays text
    assert got.count(2) == question.count("</s>") and got.count(0) == question.count("<unk>")
    assert got[1:].count(1) == question.count("<s>")                  # (no BOS first)


def test_official_turns_typed_specials_into_their_ids(tok, sentencepiece):
    """What the previous tokenization got wrong: a typed </s> was the text "</", "s", ">"."""
    got = processing.official_prompt_ids(tok, "Stop</s>here", 1, IMAGE_ID)
    tail = got[got.index(IMAGE_ID) + 1:]
    stop, here = sentencepiece("Stop"), sentencepiece("here")        # "here" right after </s>: no "▁"
    assert tail[:len(stop) + len(here) + 2] == [13] + stop + [2] + here
    assert sentencepiece("▁here") != here


# ---------------------------------------------------------------------------------------------------------------
# damro through every door, on the demo (a byte-level tokenizer: no dummy prefix; the special tokens still split)

PROMPT = "Is it red </s> or blue?"


def test_the_api_feeds_damros_ids(demo_pipe):
    img = processing.load_image("assets/example.jpg")
    r = demo_pipe.generate(img, PROMPT, max_new_tokens=2, conv_mode="llava_v1", prompt_tokenization="damro")
    ids = processing.damro_prompt_ids(demo_pipe.tokenizer, PROMPT, "llava_v1", 576, 259)
    assert r.prompt_ids == ids and ids.count(2) == 1                 # the typed </s> is EOS's id
    assert demo_pipe.prompt_ids(PROMPT, "llava_v1", "llava", 576)[0].tolist() != ids
    with pytest.raises(MinivarError, match="must be llava, official or damro, got 'Damro'"):
        demo_pipe.generate(img, PROMPT, max_new_tokens=1, conv_mode="llava_v1", prompt_tokenization="Damro")


def cli_args(prompt=PROMPT, conv_mode="llava_v1", tokenization="damro"):
    return ["--image", "assets/example.jpg", "--prompt", prompt, "--model", "demo", "--max-new-tokens", "1",
            "--dtype", "float32", "--device", "cpu", "--conv-mode", conv_mode, "--prompt-tokenization", tokenization,
            "--json"]


def test_the_command_line_takes_damro_and_reports_it(demo_env):
    rc, out, err = run_cli(cli_args())
    assert rc == 0, err
    record = json.loads(out)
    assert record["prompt_tokenization"] == "damro" and record["prompt_ids"].count(2) == 1
    assert record["prompt_ids"] == processing.damro_prompt_ids(
        processing.Tokenizer(demo_env / "demo", 259), PROMPT, "llava_v1", 576, 259)
    assert_one_line_error(*run_cli(cli_args(tokenization="dammro")), "--prompt-tokenization")
    assert_one_line_error(*run_cli(cli_args(prompt="one <image> more")), "<image>")


def test_the_harness_records_damro_and_refuses_to_resume_with_another(demo_env, tmp_path):
    import test_eval_harness as th
    from minivar.eval import benchmarks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(benchmarks, "get", th.fake_get, raising=False)
        root = th.make_data(tmp_path / "data", n_images=1, per_image=2)
        args = ["run", "tinyyn", "--data", root / "questions.jsonl", "--images", root / "images", "--out",
                tmp_path / "run", "--model", "demo", "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "1",
                "--conv-mode", "llava_v1", "--prompt-tokenization", "damro"]
        rc, out, err = th.cli(args)
        assert rc == 0, err
        assert json.loads((tmp_path / "run" / "run.json").read_text())["prompt_tokenization"] == "damro"
        answers = (tmp_path / "run" / "answers.jsonl").read_text()
        rc, out, err = th.cli(args[:-1] + ["llava"])
        assert rc == 2 and "--prompt-tokenization" in err, err
        assert (tmp_path / "run" / "answers.jsonl").read_text() == answers


def test_the_plugin_takes_damro(demo_weights):
    pytest.importorskip("lmms_eval")
    from minivar.lmms_plugin import Minivar
    lm = Minivar(pretrained="demo", device="cpu", dtype="float32", weights_dir=str(demo_weights),
                 conv_mode="llava_v1", prompt_tokenization="damro")
    prompt, cont = lm.encode_pair(PROMPT, " yes")
    assert prompt == processing.damro_prompt_ids(lm.pipeline.tokenizer, PROMPT, "llava_v1", 576, 259)
    whole = processing.slow_llama_ids(lm.pipeline.tokenizer, processing.build_prompt(PROMPT, "llava_v1") + " yes",
                                      processing.special_tokens(lm.pipeline.tokenizer))
    assert prompt + cont == expand_at(whole, 259, 576, bos=1)
    with pytest.raises(MinivarError, match="prompt_tokenization=official: .*vicuna_v1"):
        Minivar(pretrained="demo", device="cpu", dtype="float32", weights_dir=str(demo_weights),
                conv_mode="llava_v1", prompt_tokenization="official")
    with pytest.raises(MinivarError, match="prompt_tokenization='slow'"):
        Minivar(pretrained="no/such-model-anywhere", prompt_tokenization="slow")


def expand_at(ids, image_id, n, bos):
    at = ids.index(image_id)
    return [bos] + ids[:at] + [image_id] * n + ids[at + 1:]


def test_plugin_continuations_follow_the_tokenization(tok):
    """With the real tokenizer: " yes" after "ASSISTANT:" is "▁yes" under each rule, and prompt + continuation are
    the ids of the whole text as that rule gives them."""
    from minivar.lmms_plugin import ContinuationEncoder
    for tokenization in ("damro", "official"):
        encode = ContinuationEncoder(tok, "vicuna_v1", 4, tokenization, IMAGE_ID)
        prompt, cont = encode("Is it </s> red?", " yes")
        assert cont == [encode.raw.token_to_id("▁yes")]
        if tokenization == "damro":
            assert prompt == processing.damro_prompt_ids(tok, "Is it </s> red?", "vicuna_v1", 4, IMAGE_ID)
        else:
            assert prompt == processing.official_prompt_ids(tok, "Is it </s> red?", 4, IMAGE_ID)
