"""Cutting models eta does not know, from their torch.fx graph: a plain PyTorch ResNet with its own
forward, torchvision's ResNet and MobileNetV3 (and the other families auto finds), bad cuts."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from eta.errors import EtaError
from eta.teachers import block_io_shapes, build_teacher, features_at_blocks, split_teacher
from tests.test_teachers import _scramble_norms


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class GatedBlock(BasicBlock):
    """A block with data-dependent control flow: torch.fx cannot trace into it."""

    def forward(self, x):
        if x.abs().amax() > 1e6:
            return x
        return super().forward(x)


class CifarResNet(nn.Module):
    """The usual CIFAR ResNet: a class whose forward calls conv1, bn1, relu, layer1..3, pooling and fc."""

    def __init__(self, num_classes=10, in_chans=3, widths=(8, 16, 32), depth=2, block=BasicBlock):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        cin = widths[0]
        for i, w in enumerate(widths):
            layers = []
            for j in range(depth):
                layers.append(block(cin, w, 2 if i and not j else 1))
                cin = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def cifar_resnet(num_classes=10):
    """A builder that takes num_classes only, like torchvision's."""
    return CifarResNet(num_classes=num_classes)


def _params(m):
    return sum(p.numel() for p in m.parameters())


def _check_exact_and_shared(model, split, x, atol=1e-5):
    """The cut computes the model, owns exactly its weights, and follows weights loaded into the model."""
    model.eval()
    split.eval()
    with torch.no_grad():
        reference = model(x)
        assert torch.allclose(split(x), reference, atol=atol)
        assert all(model.get_submodule(n) is b for n, b in zip(split.block_names, split.blocks))
        assert _params(split) == _params(model)
        other = copy.deepcopy(model)
        for p in other.parameters():
            p.mul_(1.05).add_(0.01)
        model.load_state_dict(other.state_dict())
        assert not torch.allclose(model(x), reference, atol=1e-4)
        assert torch.allclose(split(x), other(x), atol=atol)
    assert _params(copy.deepcopy(split.head)) == _params(model) - _params(split.stem) - _params(split.blocks)


def _resnet():
    torch.manual_seed(0)
    model = CifarResNet()
    _scramble_norms(model)
    return model.eval()


BLOCKS = [f"layer{i}.{j}" for i in (1, 2, 3) for j in (0, 1)]


@pytest.mark.parametrize("blocks", [BLOCKS, ["layer1", "layer2", "layer3"], "auto"], ids=["blocks", "stages", "auto"])
def test_plain_pytorch_resnet_is_cut_from_its_graph(blocks):
    model = _resnet()
    split = split_teacher(model, blocks)
    assert split.block_names == (BLOCKS if blocks == "auto" else blocks)
    assert isinstance(split.stem, fx.GraphModule) and isinstance(split.head, fx.GraphModule)
    x = torch.randn(3, 3, 16, 16)
    _check_exact_and_shared(model, split, x)
    shapes = block_io_shapes(split, (3, 16, 16))
    assert shapes[0][0] == (8, 16, 16) and shapes[-1][1] == (32, 4, 4)
    # the stem is conv1/bn1/relu only, the head pooling and fc only
    assert {n for n, _ in split.stem.named_modules() if n} == {"conv1", "bn1", "relu"}
    assert {n for n, _ in split.head.named_modules() if n} == {"avgpool", "fc"}


def test_graph_pieces_export_and_copy():
    """Latency tables compile the stem and head alone (torch.export); students deep-copy them."""
    model = _resnet()
    split = split_teacher(model, "auto")
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        h = split.stem(x)
        for b in split.blocks:
            h = b(h)
        stem = torch.export.export(split.stem, (x,)).module()
        head = torch.export.export(split.head, (h,)).module()
        assert torch.allclose(stem(x), split.stem(x), atol=1e-6) and torch.allclose(head(h), split.head(h), atol=1e-6)
        head_copy = copy.deepcopy(split.head)
        model.fc.weight.mul_(2)  # the copy is a copy; the split's head is the teacher's
        assert torch.allclose(split.head(h), model.fc(torch.flatten(model.avgpool(h), 1)))
        assert not torch.allclose(head_copy(h), split.head(h))


def test_untraceable_block_is_kept_whole_by_auto():
    torch.manual_seed(0)
    model = CifarResNet(block=GatedBlock).eval()
    split = split_teacher(model, "auto")
    assert split.block_names == BLOCKS
    _check_exact_and_shared(model, split, torch.randn(2, 3, 16, 16))
    with pytest.raises(EtaError, match=r"cannot trace teacher 'layer1\.0' of CifarResNet.*control flow") as e:
        split_teacher(model, ["layer1.0.conv1", "layer1.0.bn1"])
    assert "\n" not in str(e.value)


class TwoInputs(nn.Module):
    def forward(self, x, y):
        return x + y


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.mix = TwoInputs()
        self.fc = nn.Linear(3, 4)
        self.unused = nn.ReLU()

    def forward(self, x):
        return self.fc(self.mix(self.conv(x), x).mean((2, 3)))


class Branchy(nn.Module):
    """Data-dependent control flow in the model's own forward."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        if x.mean() > 0:
            x = self.a(x)
        return self.fc(x.mean((2, 3)))


def test_bad_cuts_name_the_module_in_one_line():
    model = _resnet()
    cases = [
        (model, ["layer1.0.conv1", "layer1.0.bn1"], r"in CifarResNet.*uses .* computed before 'layer1\.0\.conv1'"),
        (model, ["layer1.0", "layer2.0"], r"output of 'layer1\.0' of CifarResNet goes to 'layer1\.1\.conv1', not only to the next block 'layer2\.0'.*consecutive"),
        (model, ["layer2", "layer1"], r"'layer1' runs before 'layer2'"),
        (model, ["layer1", "layer1.0"], r"'layer1\.0' is inside 'layer1'"),
        (model, ["layer9"], r"'layer9' is not a module of CifarResNet \(children of CifarResNet: conv1, bn1"),
        (model, ["conv1.weight"], r"'conv1\.weight' of CifarResNet is a tensor"),
        (model, ["layer1.0.shortcut"], r"uses 'layer1\.0\.bn2' computed before 'layer1\.0\.shortcut'"),
        (Mixer(), ["unused"], r"'unused' of Mixer is not called"),
        (Mixer(), ["mix"], r"teacher\.blocks: 'mix' of Mixer has 2 inputs in the traced graph"),
        (Mixer(), ["conv"], r"the output of Mixer does not depend|uses the input|computed before 'conv'"),
        (Branchy(), ["a"], r"cannot trace teacher Branchy with torch\.fx .*control flow"),
        (Branchy(), "auto", r"cannot trace teacher Branchy"),
    ]
    for net, blocks, pattern in cases:
        with pytest.raises(EtaError, match=pattern) as e:
            split_teacher(net, blocks)
        assert "\n" not in str(e.value), str(e.value)


class DropoutHead(nn.Module):
    """A head that reads self.training (functional dropout): traced, it differs between the modes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, 2))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.body(F.relu(self.stem(x)))
        return self.fc(F.dropout(x.mean((2, 3)), 0.5, self.training))


def test_mode_dependent_code_follows_the_mode():
    torch.manual_seed(0)
    model = DropoutHead()
    split = split_teacher(model, "auto")
    assert split.block_names == ["body.0", "body.1"]
    x = torch.randn(4, 3, 8, 8)
    model.train(), split.train()
    torch.manual_seed(1)
    reference = model(x)
    torch.manual_seed(1)
    assert torch.equal(split(x), reference)  # same dropout mask, batch statistics in both
    model.eval(), split.eval()
    with torch.no_grad():
        assert torch.allclose(split(x), model(x), atol=1e-6) and not torch.allclose(model(x), reference, atol=1e-3)


TORCHVISION = [  # builder, expected first and last block, number of blocks
    ("resnet18", "layer1.0", "layer4.1", 8),
    ("mobilenet_v3_small", "features.1", "features.11", 11),
]


@pytest.mark.parametrize("name,first,last,n", TORCHVISION, ids=[c[0] for c in TORCHVISION])
def test_torchvision_models_are_cut_automatically(name, first, last, n):
    torch.manual_seed(0)
    model = build_teacher(f"torchvision.models:{name}", num_classes=10, in_chans=3, kwargs={"weights": None})
    _scramble_norms(model)
    split = split_teacher(model.eval(), "auto")
    assert (split.block_names[0], split.block_names[-1], len(split.blocks)) == (first, last, n)
    _check_exact_and_shared(model, split, torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("name,blocks,first", [
    ("efficientnet_b0", 16, "features.1.0"), ("regnet_y_400mf", 16, "trunk_output.block1.block1-0"),
    ("convnext_tiny", 21, "features.1.0"), ("mobilenet_v2", 17, "features.1")])
def test_other_torchvision_families(name, blocks, first):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    split = split_teacher(model, "auto")
    assert len(split.blocks) == blocks and split.block_names[0] == first
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(split(x), model(x), atol=1e-5)


@pytest.mark.parametrize("name,first,some", [("convnext_atto", "stages.0.blocks.0", "stages.1.downsample"),
                                             ("regnetx_002", "s1.b1", "s4.b7")])
def test_timm_families_without_their_own_splitter(name, first, some):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    split = split_teacher(model, "auto")
    assert split.block_names[0] == first and some in split.block_names
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(split(x), model(x), atol=1e-5)


def test_build_callables_that_take_num_classes_only():
    torch.manual_seed(0)
    model = build_teacher("torchvision.models:resnet18", num_classes=10, in_chans=1)
    reference = build_teacher("torchvision.models:resnet18", num_classes=10, in_chans=3)
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 64 and reference.conv1.in_channels == 3
    # the adapted conv is the 3-channel one summed over its input channels: same response to a grey image
    model.load_state_dict({k: v for k, v in reference.state_dict().items() if k != "conv1.weight"}, strict=False)
    with torch.no_grad():
        model.conv1.weight.copy_(reference.conv1.weight.sum(1, keepdim=True))
        grey = torch.rand(2, 1, 32, 32)
        assert torch.allclose(model.eval()(grey), reference.eval()(grey.expand(-1, 3, -1, -1)), atol=1e-4)
    mine = build_teacher("tests.test_graph_cut:cifar_resnet", num_classes=4, in_chans=2)
    assert mine.conv1.in_channels == 2 and mine(torch.randn(1, 2, 8, 8)).shape == (1, 4)
    assert split_teacher(mine.eval()).block_names == BLOCKS
    with pytest.raises(EtaError, match=r"'torchvision\.models:resnet18' failed when called with .*colour.*TypeError"):
        build_teacher("torchvision.models:resnet18", num_classes=10, in_chans=3, kwargs={"colour": "red"})
    with pytest.raises(EtaError, match=r"'tests\.test_graph_cut:cifar_resnet' must accept num_classes="):
        build_teacher("tests.test_graph_cut:cifar_resnet", num_classes=10, in_chans=3, kwargs={"depth": 3})
    with pytest.raises(EtaError, match=r"'tests\.test_graph_cut:Mixer' must accept num_classes="):
        build_teacher("tests.test_graph_cut:Mixer", num_classes=10, in_chans=3)
    with pytest.raises(EtaError, match=r"no nn\.Conv2d to adapt"):
        build_teacher("tests.test_graph_cut:linear_only", num_classes=10, in_chans=3)


def linear_only(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))


def test_phase1_distillation_on_a_cut_torchvision_model():
    """Block-wise distillation on the cut: the block's real input and output, and a student that learns it."""
    torch.manual_seed(0)
    model = build_teacher("torchvision.models:resnet18", num_classes=10, in_chans=3).eval()
    _scramble_norms(model)
    split = split_teacher(model, "auto")
    b = split.block_names.index("layer2.0")
    seen = {}
    hook = model.get_submodule("layer2.0").register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        model(x)
        hook.remove()
        t_in, t_out = features_at_blocks(split, x, [b])[b]
    assert torch.equal(t_in, seen["x"]) and torch.equal(t_out, seen["y"]) and t_out.shape == (8, 128, 4, 4)
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(64, 128, 3, 2, 1), nn.BatchNorm2d(128), nn.ReLU(), nn.Conv2d(128, 128, 1))
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        xb = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(step))
        with torch.no_grad():
            t_in, t_out = features_at_blocks(split, xb, [b])[b]
        loss = F.mse_loss(student(t_in), t_out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.3 * sum(losses[:5])


def test_bound_space_with_a_torchvision_teacher():
    from eta.bound import BoundSpace
    from eta.space import parse_space
    from tests.conftest import tiny_space_dict

    d = tiny_space_dict()
    d["teacher"] = {"model": "torchvision.models:resnet18", "blocks": "auto"}
    d["data"]["resolution"] = 32
    d["pool"] = [{"family": "basic", "kernel": [3], "expansion": [0.5, 1.0]}, {"family": "identity"}, {"family": "teacher"}]
    bound = BoundSpace.build(parse_space(d), in_chans=1, num_classes=10)
    assert bound.split.block_names[0] == "layer1.0" and len(bound.shapes) == 8
    assert bound.shapes[0] == ((64, 8, 8), (64, 8, 8)) and bound.teacher.conv1.in_channels == 1
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(bound.split(x), bound.teacher(x), atol=1e-5)
