"""The ImageNet-scale spaces stay runnable: each is built at a tiny resolution with random weights, its
teacher cut into blocks exactly, a few phase-1 steps run on its first and last block, and one latency
entry is compiled and timed with TVM. Real runs need ImageNet and a GPU; these catch a space that rots."""
import numpy as np
import pytest
import torch
import yaml

from eta.bound import bind, splits_for
from eta.phases.pretrain import pretrain_group
from eta.latency import tvm_backend
from eta.latency.protocol import Protocol
from eta.space import parse_space


from .conftest import REPO

SPACES = {"imagenet_efficientnet_b2": 23, "imagenet_resnet50": 16, "imagenet_vit_b16": 12}


def tiny(name: str, res: int = 32):
    d = yaml.safe_load((REPO / "search_spaces" / f"{name}.yaml").read_text())
    d["teacher"]["pretrained"] = False  # no download in tests; weights do not matter for what is checked
    if "img_size" in d["teacher"].get("kwargs", {}):
        d["teacher"]["kwargs"]["img_size"] = res
    d["data"] = {"dataset": "digits", "resolution": res, "max_train": 80, "batch_size": 16}
    d["resolutions"] = [res]
    d["latency"].update(target="llvm", max_slowdown=None)
    d["pretrain"].update(batch_size=16, num_gpus=0, num_cpus=1)
    return parse_space(d, f"{name} (tiny)")


@pytest.mark.parametrize("name", sorted(SPACES))
def test_imagenet_space_builds_cuts_distils_and_measures(name):
    torch.manual_seed(0)
    space = tiny(name)
    splits = splits_for(space)
    bound = bind(space, splits)
    assert bound.num_blocks == SPACES[name]
    x = torch.randn(2, bound.in_chans, 32, 32)
    with torch.no_grad():
        bound.teacher.eval()
        torch.testing.assert_close(bound.split(x), bound.teacher(x), rtol=1e-4, atol=1e-4)  # the cut is exact
    for b, opts in enumerate(bound.options):
        families = {o.family for o in opts}
        assert "teacher" in families and len(families - {"teacher", "identity"}) >= 1, f"block {b}: {opts}"
        ins, outs = bound.shapes[b]
        assert ("identity" in families) == (tuple(ins) == tuple(outs))
    last = bound.num_blocks - 1
    out = pretrain_group(bound, splits, [0, last], seed=0)
    for b in (0, last):
        state, metrics = out[b]
        assert state and all(torch.isfinite(t).all() for t in state.values())
        assert all(np.isfinite(v) for v in metrics["candidates"].values())
    spec = next(o for o in bound.options[last] if o.family not in ("teacher", "identity"))
    shape = (1, *bound.shapes[last][0])
    m = tvm_backend.measure(bound.operator(last, spec).eval(), shape, tvm_backend.host_target(num_cores=1),
                            Protocol(repeat=3, min_repeat_ms=1.0, retries=0, max_slowdown=None))
    assert m.median_ms > 0


def test_pretrained_teacher_is_loaded_not_trained(tmp_path, monkeypatch):
    """teacher.pretrained takes timm's weights on the driver, saves them in the run, and trains nothing."""
    import timm

    from eta import train
    from eta.pipeline import Search

    from .conftest import tiny_space_dict

    d = tiny_space_dict()
    d["teacher"] = {"model": "resnet18", "pretrained": True, "checkpoint": None}
    real = timm.create_model
    calls = []

    def fake_create(name, pretrained=False, **kw):
        model = real(name, pretrained=False, **kw)
        if pretrained:
            calls.append(name)
            torch.manual_seed(123)
            for p in model.parameters():
                p.data.normal_(0, 0.01)
        return model

    monkeypatch.setattr(timm, "create_model", fake_create)
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("a pretrained teacher must not be trained"))
    search = Search(parse_space(d, "test"), runs_dir=tmp_path, progress=False)
    search.phase("teacher")
    assert calls == ["resnet18"]
    from eta.files import load_tensors

    saved = load_tensors(search.teacher_path)
    expected = fake_create("resnet18", pretrained=True, num_classes=10, in_chans=1).state_dict()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_pretrained_needs_a_timm_teacher():
    from eta.errors import EtaError
    from eta.teachers import pretrained_state

    with pytest.raises(EtaError, match="teacher.pretrained applies to timm models"):
        pretrained_state("eta.zoo:tiny_mbnet", None)
