"""The CPU bf16 speed path of the vision towers (models/packed.py): pre-packed oneDNN weights give F.linear's
numbers bit for bit, and a model loaded with them gives the same image features and tokens as one without."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minivar.checkpoint import load_model
from minivar.generate import generate
from minivar.models import packed
from minivar.models.packed import PackedLinear

pytestmark = pytest.mark.skipif(not packed.available(), reason="oneDNN does not run bf16 on this CPU")


@pytest.mark.parametrize("rows", [1, 2, 7, 577])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(64, 32), (37, 64), (1024, 256)])
def test_packed_linear_equals_linear_bit_for_bit(rows, bias, shape):
    torch.manual_seed(rows)
    lin = nn.Linear(shape[1], shape[0], bias=bias).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(2, rows, shape[1]).to(torch.bfloat16)
    p = PackedLinear(lin)
    assert p.weight.shape == lin.weight.shape and p.weight.dtype == torch.bfloat16
    assert torch.equal(p(x), F.linear(x, lin.weight, lin.bias))
    # a strided input: F.linear's own numbers on it depend on the path it takes, the packed layer's do not
    xt = x.transpose(0, 1)
    assert torch.equal(p(xt), F.linear(xt.contiguous(), lin.weight, lin.bias))


def test_pack_linears_replaces_only_bf16_cpu_linears():
    m = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16), nn.GELU(), nn.Sequential(nn.Linear(8, 4).to(torch.bfloat16)),
                      nn.Linear(4, 4))                                                    # the last stays fp32
    x = torch.randn(3, 8).to(torch.bfloat16)
    before = m[2](m[1](m[0](x)))
    assert packed.pack_linears(m) == 2
    assert isinstance(m[0], PackedLinear) and isinstance(m[2][0], PackedLinear) and type(m[3]) is nn.Linear
    assert torch.equal(m[2](m[1](m[0](x))), before)
    assert packed.pack_linears(None) == 0


def test_llava_loaded_in_bf16_packs_the_tower_and_answers_the_same(tiny_checkpoint):
    plain = load_model(tiny_checkpoint, torch.bfloat16, pack=False)
    fast = load_model(tiny_checkpoint, torch.bfloat16)
    tower = fast.vision_tower
    assert any(isinstance(m, PackedLinear) for m in tower.modules())
    assert not any(isinstance(m, PackedLinear) for m in fast.language_model.modules())   # the decoder stays plain
    assert not any(isinstance(m, PackedLinear) for m in load_model(tiny_checkpoint, torch.float32).modules())
    torch.manual_seed(0)
    px = torch.randn(2, 3, 56, 56).to(torch.bfloat16)
    with torch.inference_mode():
        a, b = plain.image_features(px), fast.image_features(px)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        ids = torch.tensor([[1, 5, *[plain.config.image_token_index] * a[0].shape[0], 7, 9]])
        g1 = generate(plain, ids, px[:1], max_new_tokens=6, eos_token_id=None)
        g2 = generate(fast, ids, px[:1], max_new_tokens=6, eos_token_id=None)
    assert g1.output_ids == g2.output_ids


def test_a_contrastive_load_packs_the_decoder_and_gives_the_same_answers(demo_weights):
    """minivar.load(contrastive=True), what --damro / --vcd load: the decoder's weights packed as well; DAMRO's and
    VCD's answers (two rows per step) are the plain load's."""
    import minivar
    from minivar.methods.damro import DAMRO, DAMROConfig
    from minivar.methods.vcd import VCD, VCDConfig
    from PIL import Image
    plain = minivar.load("demo", device="cpu", dtype="bfloat16", weights_dir=demo_weights)
    fast = minivar.load("demo", device="cpu", dtype="bfloat16", weights_dir=demo_weights, contrastive=True)
    layers = fast.model.language_model.model.layers
    assert all(isinstance(m, PackedLinear) for layer in layers for m in (layer.self_attn.q_proj, layer.mlp.up_proj))
    assert isinstance(fast.model.language_model.lm_head, PackedLinear)
    assert not any(isinstance(m, PackedLinear) for m in plain.model.language_model.modules())
    image = Image.new("RGB", (40, 30), (200, 40, 40))
    for method in (DAMRO(DAMROConfig(alpha=1.0, beta=0.1, topk=4)), VCD(VCDConfig(), seed=3)):
        a, b = (p.generate(image, "What is in the image?", max_new_tokens=8, methods=[method]) for p in (plain, fast))
        assert a.output_ids == b.output_ids and a.reports == b.reports


def test_pack_linears_under_given_paths_only():
    m = nn.Sequential()
    m.add_module("layers", nn.ModuleList([nn.Linear(8, 8).to(torch.bfloat16) for _ in range(2)]))
    m.add_module("layers_extra", nn.Linear(8, 8).to(torch.bfloat16))        # a sibling whose name only starts alike
    m.add_module("head", nn.Linear(8, 4).to(torch.bfloat16))
    assert packed.pack_linears(m, under=("layers", "head")) == 3
    assert all(isinstance(x, PackedLinear) for x in (m.layers[0], m.layers[1], m.head))
    assert type(m.layers_extra) is nn.Linear
