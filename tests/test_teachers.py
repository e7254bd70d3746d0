"""Teacher splitting: the cut reproduces the teacher exactly, for every supported family; the zoo teachers."""
import copy

import pytest
import torch
from torch import nn

from eta.errors import EtaError
from eta.teachers import block_io_shapes, build_teacher, features_at_blocks, split_teacher
from eta.zoo import small_resnet, tiny_mbnet

CASES = [  # model, in_chans, resolution, kwargs, number of blocks (None: whatever timm builds)
    ("eta.zoo:tiny_mbnet", 1, 32, {}, 6),
    ("eta.zoo:small_resnet", 1, 28, {}, 7),
    ("resnet10t", 3, 32, {"drop_rate": 0.2}, 4),
    ("test_efficientnet", 3, 32, {}, None),
    ("mobilenetv2_035", 3, 32, {}, 17),
    ("mobilenetv3_small_050", 3, 32, {}, None),
    ("test_vit", 3, 32, {"img_size": 32}, 6),
    # prefix tokens, separate position embedding and average pooling must all reach the split's stem/head
    ("test_vit", 3, 32, {"img_size": 32, "reg_tokens": 2, "no_embed_class": True, "global_pool": "avg",
                         "dynamic_img_size": False}, 6),
]


def _scramble_norms(model: nn.Module) -> None:
    """Random BatchNorm statistics and affine terms, so no block is an identity by initialisation."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def _build(name, ch, kw):
    torch.manual_seed(0)
    model = build_teacher(name, num_classes=7, in_chans=ch, kwargs=kw)
    _scramble_norms(model)
    return model.eval()


@pytest.mark.parametrize("name,ch,res,kw,n_blocks", CASES, ids=[f"{c[0]}{'+' if len(c[3]) > 1 else ''}" for c in CASES])
def test_split_reproduces_teacher(name, ch, res, kw, n_blocks):
    model = _build(name, ch, kw)
    split = split_teacher(model)
    if n_blocks:
        assert len(split.blocks) == n_blocks
    assert len(split.blocks) >= 4
    # block names are the blocks' real paths in the teacher
    assert all(model.get_submodule(n) is b for n, b in zip(split.block_names, split.blocks))
    x = torch.randn(3, ch, res, res)
    with torch.no_grad():
        reference = model(x)
        assert torch.allclose(split(x), reference, atol=1e-5)
        shapes = block_io_shapes(split, (ch, res, res))
        feats = features_at_blocks(split, x, range(len(split.blocks)))
    assert len(shapes) == len(split.blocks)
    for i, (ins, outs) in enumerate(shapes):
        assert tuple(feats[i][0].shape[1:]) == ins and tuple(feats[i][1].shape[1:]) == outs
        if i:
            assert shapes[i - 1][1] == ins
    assert sum(p.numel() for p in split.parameters()) == sum(p.numel() for p in model.parameters())
    # the pieces share the teacher's weights: changing the teacher changes the split alike
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
        assert not torch.allclose(model(x), reference, atol=1e-4)
        assert torch.allclose(split(x), model(x), atol=1e-5)
    # a deep copy of the head (students keep it) holds only the head, not the whole teacher
    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(copy.deepcopy(split.head)) == count(model) - count(split.stem) - count(split.blocks)


def test_features_at_blocks_is_one_partial_forward():
    model = _build("eta.zoo:tiny_mbnet", 1, {})
    split = split_teacher(model)
    calls = []
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: calls.append(k))
             for k, m in [("stem", split.stem)] + [(j, b) for j, b in enumerate(split.blocks)]]
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        feats = features_at_blocks(split, x, [3, 1])
    for h in hooks:
        h.remove()
    assert calls == ["stem", 0, 1, 2, 3]  # one pass, and nothing after the last asked block
    with torch.no_grad():
        h = split.stem(x)
        for b in split.blocks[:3]:
            h = b(h)
        assert torch.equal(feats[1][0], split.blocks[0](split.stem(x))) and torch.equal(feats[3][0], h)
        assert torch.equal(feats[3][1], split.blocks[3](h)) and sorted(feats) == [1, 3]
    with pytest.raises(IndexError):
        features_at_blocks(split, x, [6])


@pytest.mark.parametrize("name", ["test_vit", "mobilenetv3_small_050"])
def test_stem_and_head_export(name):
    """Latency tables compile the stem and head alone, through torch.export."""
    model = _build(name, 3, {"img_size": 32} if "vit" in name else {})
    split = split_teacher(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        h = split.stem(x)
        for b in split.blocks:
            h = b(h)
        stem = torch.export.export(split.stem, (x,)).module()
        head = torch.export.export(split.head, (h,)).module()
        assert torch.allclose(head(h), split.head(h), atol=1e-5) and torch.allclose(stem(x), split.stem(x), atol=1e-5)


def test_explicit_blocks_regroup_automatic_ones():
    model = _build("resnet10t", 3, {})
    x = torch.randn(2, 3, 32, 32)
    split = split_teacher(model, ["layer2", "layer3.0"])
    assert split.block_names == ["layer2", "layer3.0"] and split.blocks[0] is model.layer2
    with torch.no_grad():
        assert torch.allclose(split(x), model(x), atol=1e-5)
    assert [s[0][0] for s in block_io_shapes(split, (3, 32, 32))] == [64, 128]  # layer1 went into the stem
    with pytest.raises(EtaError, match="directly follow"):
        split_teacher(model, ["layer1", "layer3"])
    with pytest.raises(EtaError, match="not a block"):
        split_teacher(model, ["fc"])
    with pytest.raises(EtaError, match="inside block 'layer1.0'"):
        split_teacher(model, ["layer1.0.conv1"])
    tiny = _build("eta.zoo:tiny_mbnet", 1, {})
    whole = split_teacher(tiny, ["blocks"])  # one block holding all six
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert len(whole.blocks) == 1 and torch.allclose(whole(x), tiny(x), atol=1e-5)


def test_explicit_blocks_of_nested_sequentials():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU()),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 1, 8, 8)
    split = split_teacher(model, ["2.1", "2.2", "2.3"])
    with torch.no_grad():
        assert torch.allclose(split(x), model(x))
    assert len(split.stem) == 3 and len(split.head) == 3  # conv, relu, inner conv | pool, flatten, linear
    assert block_io_shapes(split, (1, 8, 8)) == [((4, 8, 8), (4, 8, 8)), ((4, 8, 8), (8, 8, 8)), ((8, 8, 8), (8, 8, 8))]
    split = split_teacher(model, ["1", "2"])
    with torch.no_grad():
        assert torch.allclose(split(x), model(x))
    with pytest.raises(EtaError, match=r"'2\.9' is not a module of Sequential \(children of '2': 0, 1, 2, 3\)"):
        split_teacher(model, ["2.9"])
    with pytest.raises(EtaError, match="consecutive"):
        split_teacher(model, ["2.0", "2.2"])
    # blocks from two containers are no nn.Sequential chain, but the graph cuts them
    split = split_teacher(model, ["1", "2.0"])
    assert isinstance(split.stem, torch.fx.GraphModule) and split.blocks[1] is model[2][0]
    with torch.no_grad():
        assert torch.allclose(split(x), model(x))


def test_unsplittable_and_unknown_teachers():
    from tests.unsplittable import make

    with pytest.raises(EtaError, match=r"Opaque.*teacher\.blocks"):
        split_teacher(make())
    with pytest.raises(EtaError, match="Opaque"):
        split_teacher(make(), ["w"])
    with pytest.raises(EtaError, match="neither a timm model.*resnet18"):
        build_teacher("resnet81", num_classes=10, in_chans=1)
    with pytest.raises(EtaError, match="cannot import"):
        build_teacher("eta.zoo:nope", num_classes=10, in_chans=1)
    with pytest.raises(EtaError, match="must accept"):
        build_teacher("eta.zoo:tiny_mbnet", num_classes=10, in_chans=1, kwargs={"colour": "red"})
    with pytest.raises(EtaError, match="teacher.kwargs"):
        build_teacher("resnet10t", num_classes=10, in_chans=1, kwargs={"colour": "red"})
    vit = split_teacher(build_teacher("test_vit", num_classes=10, in_chans=3, kwargs={"img_size": 32}))
    with pytest.raises(EtaError, match=r"does not accept inputs of shape \(4, 32, 32\)"):
        block_io_shapes(vit, (4, 32, 32))


def test_zoo_teachers():
    for make, res, max_params, widths in ((tiny_mbnet, 32, 150_000, (16, 24, 40)), (small_resnet, 28, 400_000, (16, 32, 64))):
        model = make(num_classes=10, in_chans=1).eval()
        n = sum(p.numel() for p in model.parameters())
        assert 20_000 < n < max_params
        with torch.no_grad():
            assert model(torch.randn(5, 1, res, res)).shape == (5, 10)
        shapes = block_io_shapes(split_teacher(model), (1, res, res))
        assert sorted({o[0] for _, o in shapes}) == list(widths)
        assert [o[1] for _, o in shapes][-1] == res // 4  # two stride-2 transitions
    assert tiny_mbnet(num_classes=3, in_chans=3)(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert sum(p.numel() for p in tiny_mbnet(width_mult=2.0).parameters()) > 2 * sum(p.numel() for p in tiny_mbnet().parameters())
