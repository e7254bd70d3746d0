"""A new operator family is one registry entry plus YAML: a family written here, not in eta/, runs through
pretraining (in Ray workers), the latency table and the solve phase."""
import json

import pytest
import torch
from torch import nn

from eta import families
from eta.channels import ChannelGroup, Member
from eta.families import BlockSlot, Family
from eta.families.conv import conv_geometry
from eta.pipeline import Search
from eta.space import parse_space

from .conftest import tiny_space_dict


class ToyBlock(nn.Module):
    """k×k conv to a hidden width, BatchNorm, ReLU, 1×1 conv to the output, plus a skip where shapes agree."""

    def __init__(self, in_ch: int, out_ch: int, hidden: int, kernel: int, stride: int):
        super().__init__()
        self.skip = stride == 1 and in_ch == out_ch
        self.spread = nn.Conv2d(in_ch, hidden, kernel, stride, kernel // 2, bias=False)
        self.norm = nn.BatchNorm2d(hidden)
        self.gather = nn.Conv2d(hidden, out_ch, 1)

    def forward(self, x):
        y = self.gather(torch.relu(self.norm(self.spread(x))))
        return y + x if self.skip else y


class ToyFamily(Family):
    name = "toy"
    fields = ("kernel", "expansion")

    def fits(self, spec, slot):
        return len(slot.in_shape) == 3 and len(slot.out_shape) == 3 and spec.bits == 32

    def hidden_widths(self, spec, slot):
        return {"hidden": max(4, int(round(slot.in_shape[0] * spec.expansion)))}

    def channel_groups(self, module, slot):
        bn = tuple(Member(f"norm.{t}", 0) for t in ("weight", "bias", "running_mean", "running_var"))
        reader = Member("gather.weight", 1)
        return (ChannelGroup("hidden", (Member("spread.weight", 0), *bn, reader), reader, module.spread.out_channels),)

    def build(self, spec, slot):
        in_ch, out_ch, stride = conv_geometry(spec, slot.in_shape, slot.out_shape)
        return ToyBlock(in_ch, out_ch, self.hidden_widths(spec, slot)["hidden"], spec.kernel, stride)

    def examples(self):
        return [([{"kernel": 3, "expansion": e} for e in (0.5, 1, 2)], BlockSlot((8, 8, 8), (16, 4, 4)))]


@pytest.fixture
def toy_family():
    families.register(ToyFamily)
    yield families.get("toy")
    families.unregister("toy")


def test_a_registered_family_is_known_to_spaces_and_architecture_strings(toy_family):
    from eta.arch import OpSpec, arch_from_str

    d = tiny_space_dict()
    d["pool"] = [{"family": "toy", "kernel": [3, 5], "expansion": [1, 2]}, {"family": "teacher"}]
    space = parse_space(d)
    assert {str(s) for s in space.op_specs()} >= {"toy_k3_e1", "toy_k5_e2"}
    assert arch_from_str("toy_k3_e0.5-teacher") == (OpSpec("toy", kernel=3, expansion=0.5), OpSpec("teacher"))
    with pytest.raises(Exception, match="taken by family 'toy'"):
        families.register(type("Other", (ToyFamily,), {"name": "other", "token": "toy"}))


def test_a_family_written_outside_eta_runs_through_pretrain_latency_and_solve(toy_family, tmp_path, ray_local):
    d = tiny_space_dict(budgets=[0.7])
    d["teacher"]["train"]["epochs"] = 2
    d["pool"] = [{"family": "toy", "kernel": [3], "expansion": [0.5, 1, 2]}, {"family": "identity"}, {"family": "teacher"}]
    d["solve"].update(samples=16, sample_levels=2)
    search = Search(parse_space(d), runs_dir=tmp_path, progress=False)
    assert all(any(s.family == "toy" for s in opts) for opts in search.bound.options)
    for phase in ("teacher", "latency", "pretrain", "solve"):
        search.phase(phase)
    # pretrained in Ray workers (which received the family from the driver), the loss fell
    metrics = json.loads(search.run.pretrain_metrics.read_text())
    toy = {b: m for b, m in metrics.items() if any(k.startswith("toy_") for k in m["candidates"])}
    assert len(toy) == search.bound.num_blocks
    assert all(m["loss_last"] < m["loss_first"] for m in toy.values())
    # every width is a slice of one super-operator per block
    from eta.files import load_tensors

    state = load_tensors(search.run.block_weights(0))
    assert {k.split(".")[0] for k in state} == {"toy_k3"}
    # the latency table measured the family's operators, and the solver chose among them
    from eta.latency.table import LatencyTable
    from eta.phases.latency import space_workloads

    entries = json.loads(search.run.latency_table_copy.read_text())["entries"]
    toy_workloads = [w for w in space_workloads(search.bound) if w.signature.startswith("toy_")]
    assert len({w.signature.split("#")[0] for w in toy_workloads}) == 3  # three widths, in every block they fit
    assert all(entries[LatencyTable.key(w.signature, w.input_shape, 32)]["median_ms"] > 0 for w in toy_workloads)
    samples = json.loads(search.run.samples.read_text())
    assert any("toy_" in s["arch"] for s in samples) and len({s["proxy_acc"] for s in samples}) > 1
    solutions = json.loads(search.run.solutions.read_text())
    assert solutions and all(s["predicted_latency_ms"] <= s["budget_ms"] * (1 + 1e-6) for s in solutions)
    search.close()


def test_the_registry_tests_pass_for_the_new_family(toy_family):
    """The checks every registered family gets (tests/test_elastic.py), run on this one's examples."""
    from eta.arch import OpSpec

    from . import test_elastic as checks

    for settings, slot in toy_family.examples():
        specs = [OpSpec("toy", **s) for s in settings]
        checks.test_operators_fit_their_slot_and_map_its_shapes("toy", specs, slot)
        for mode in ("eval", "train"):
            checks.test_super_op_slice_equals_extracted_module("toy", specs, slot, mode)
        checks.test_fresh_operators_load_extracted_weights("toy", specs, slot)
        checks.test_channel_groups_cover_exactly_the_width_dependent_tensors("toy", specs, slot)
        checks.test_sort_channels_preserves_function_and_ranks_by_importance("toy", specs, slot)
        checks.test_narrow_training_touches_only_the_prefix("toy", specs, slot)


def test_the_readme_example_family_works():
    """The README's "Adding an operator family" code registers a family whose operators slice exactly."""
    import re

    from eta.arch import OpSpec

    from . import test_elastic as checks
    from .conftest import REPO

    text = (REPO / "README.md").read_text()
    section = text[text.index("#### Adding an operator family"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the project's own documentation
    try:
        slot = BlockSlot((8, 8, 8), (16, 4, 4))
        specs = [OpSpec("mixer", kernel=3, expansion=e) for e in (1, 2)]
        checks.test_operators_fit_their_slot_and_map_its_shapes("mixer", specs, slot)
        checks.test_super_op_slice_equals_extracted_module("mixer", specs, slot, "train")
        checks.test_channel_groups_cover_exactly_the_width_dependent_tensors("mixer", specs, slot)
        d = tiny_space_dict()
        d["pool"] = [{"family": "mixer", "kernel": [3, 5], "expansion": [1, 2]}, {"family": "teacher"}]
        assert "mixer_k5_e2" in {str(s) for s in parse_space(d).op_specs()}
    finally:
        families.unregister("mixer")
