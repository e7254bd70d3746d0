"""The headline benchmark's baselines: what FastNAS may resize in eta's teachers."""
import pytest
import torch

from eta.zoo import small_resnet


def test_fastnas_rules_open_every_hidden_conv_and_limits_below_its_smallest_network_are_raised():
    pytest.importorskip("modelopt.torch.nas")
    import modelopt.torch.nas as mtn
    from modelopt.torch.nas.utils import inference_flops
    from modelopt.torch.opt.dynamic import DynamicSpace

    from benchmarks.headline import FASTNAS_RULES, feasible_flops_limits

    dummy = torch.randn(1, 1, 28, 28)
    model = mtn.convert(small_resnet().eval(), mode=[("fastnas", FASTNAS_RULES)])
    names = {n.rsplit(".", 1)[0] for n, _ in DynamicSpace(model).named_hparams(configurable=True)}
    # the first conv of each of the seven basic blocks carries only hidden channels: all must be prunable, to 4 channels
    assert {f"blocks.{i}.conv1" for i in range(7)} <= names
    full = float(inference_flops(model, dummy_input=dummy, unit=1.0))
    mtn.sample(model, sample_func=min)
    smallest = float(inference_flops(model, dummy_input=dummy, unit=1.0))
    assert smallest < 0.2 * full  # with FastNAS's default divisor (32) the smallest network kept 79 % of the FLOPs

    limits = feasible_flops_limits(small_resnet().eval(), dummy, [0.01 * full, 0.02 * full, 0.5 * full])
    assert len(limits) == 2 and smallest < limits[0] < 1.05 * smallest and limits[1] == 0.5 * full
