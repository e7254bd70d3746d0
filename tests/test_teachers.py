"""Teacher splitting: the cut reproduces the teacher exactly, for every supported family."""
import pytest
import torch
from torch import nn

from eta.errors import EtaError
from eta.teachers import block_io_shapes, build_teacher, features_at_blocks, split_teacher

CASES = [
    ("eta.zoo:tiny_mbnet", 1, 32, {}, 6),
    ("eta.zoo:small_resnet", 1, 28, {}, 7),
    ("resnet18", 3, 32, {}, 8),
    ("test_efficientnet", 3, 64, {}, None),
    ("mobilenetv3_small_050", 3, 64, {}, None),
    ("test_vit", 3, 64, {"img_size": 64}, None),
]


@pytest.mark.parametrize("name,ch,res,kw,n_blocks", CASES, ids=[c[0] for c in CASES])
def test_split_reproduces_teacher(name, ch, res, kw, n_blocks):
    torch.manual_seed(0)
    model = build_teacher(name, num_classes=7, in_chans=ch, kwargs=kw).eval()
    split = split_teacher(model)
    if n_blocks:
        assert len(split.blocks) == n_blocks
    x = torch.randn(2, ch, res, res)
    with torch.no_grad():
        assert torch.allclose(split(x), model(x), atol=1e-5)
        shapes = block_io_shapes(split, (ch, res, res))
        feats = features_at_blocks(split, x, range(len(split.blocks)))
    assert sum(p.numel() for p in split.parameters()) == sum(p.numel() for p in model.parameters())
    for i, (ins, outs) in enumerate(shapes):
        assert tuple(feats[i][0].shape[1:]) == ins and tuple(feats[i][1].shape[1:]) == outs
    # the pieces share the teacher's weights: changing the teacher changes the split
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
        assert torch.allclose(split(x), model(x), atol=1e-5)


def test_explicit_blocks_of_a_sequential():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    split = split_teacher(model, ["2", "3"])
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(split(x), model(x)) and len(split.blocks) == 2
    with pytest.raises(EtaError, match="not a child"):
        split_teacher(model, ["9"])


def test_unsplittable_and_unknown_teachers():
    from tests.unsplittable import make

    with pytest.raises(EtaError, match="Opaque"):
        split_teacher(make())
    with pytest.raises(EtaError, match="neither a timm model"):
        build_teacher("no_such_model_xyz", num_classes=10, in_chans=1)
    with pytest.raises(EtaError, match="cannot import"):
        build_teacher("eta.zoo:nope", num_classes=10, in_chans=1)
