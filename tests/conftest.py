import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

REPO = Path(__file__).resolve().parent.parent
IN_OWN_PROCESS = os.environ.get("ETA_TEST_OWN_PROCESS") == "1"


def rerun_in_own_process(request, timeout: int = 900) -> None:
    """Run the calling test again in a fresh pytest process, with a Ray session of its own.

    For tests whose Ray Train worker groups may keep their resources after the run returns (seen
    after a Tune trial drove a Train run): in the shared test session they would starve later tests.
    """
    import subprocess
    import sys

    env = {**os.environ, "ETA_TEST_OWN_PROCESS": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", request.node.nodeid],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


@pytest.fixture(autouse=True, scope="session")
def _private_latency_tables(tmp_path_factory):
    """Tests measure into their own tables, never into the repository's predictors/."""
    os.environ["ETA_PREDICTORS_DIR"] = str(tmp_path_factory.mktemp("predictors"))
    yield


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster on loopback for the tests that need it, shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def digits_space_dict():
    return yaml.safe_load((REPO / "search_spaces" / "digits.yaml").read_text())


def tiny_space_dict(**overrides):
    """A digits space small enough to run all phases in about a minute."""
    d = yaml.safe_load((REPO / "search_spaces" / "digits.yaml").read_text())
    d["name"] = "tiny"
    d["teacher"]["train"]["epochs"] = 6
    d["data"]["resolution"] = 16
    d["pool"] = [
        {"family": "ir", "kernel": [3], "expansion": [2, 4]},
        {"family": "identity"},
        {"family": "teacher"},
    ]
    d["resolutions"] = [12, 16]
    d["latency"]["calibration_students"] = 3
    d["latency"]["repeat"] = 3
    d["latency"]["schedules"] = "untuned"  # tuning is tested on its own (tests/test_tuning.py, the slow tuned search)
    d["latency"]["max_slowdown"] = None  # the slow-spell check is tested on its own (tests/test_steadiness.py)
    d["budgets"] = [0.6, 0.85]
    d["pretrain"] = {"epochs": 2, "lr": 0.003, "batch_size": 64, "elastic": True, "sort_every": 10}
    d["solve"] = {"samples": 24, "sample_levels": 3, "holdout": 0.25, "bn_batches": 2, "solutions_per_budget": 1,
                   "predictor": {"hidden": 16, "epochs": 100}}
    d["finetune"] = {"epochs": 2, "batch_size": 64, "max_students": 2}
    for k, v in overrides.items():
        d[k] = v
    return d


@pytest.fixture
def tiny_space_file(tmp_path):
    def make(**overrides):
        p = tmp_path / "tiny.yaml"
        p.write_text(yaml.safe_dump(tiny_space_dict(**overrides)))
        return p

    return make


def with_batchnorm_statistics(module, in_shape, *, seed: int = 0, batch: int = 16):
    """Random batch-norm affine parameters and running statistics from a few training batches, in eval mode.

    Quantization tests need BN that is not the identity, or a dropped or misfolded BN would go unseen.
    """
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
    module.train()
    with torch.no_grad():
        for _ in range(4):
            module(torch.randn(batch, *in_shape, generator=g))
    return module.eval()
