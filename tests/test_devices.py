"""Devices and mixed precision: CPU stays float32; the CUDA paths run where a GPU exists (marked gpu)."""
import pytest
import torch

from eta.devices import amp_dtype, autocast, grad_scaler, pick_device
from eta.errors import EtaError
from eta.threads import cores_idle_while_training, torch_threads

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cpu_stays_full_precision():
    assert pick_device(0) == torch.device("cpu")
    assert amp_dtype("cpu") is None and amp_dtype("cpu", None) is None and grad_scaler("cpu") is None
    assert amp_dtype("cpu", "bf16") is torch.bfloat16  # asked for explicitly, CPU autocast is allowed
    with autocast("cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(EtaError, match="amp must be one of"):
        amp_dtype("cpu", "fp8")
    if not torch.cuda.is_available():
        assert pick_device(1) == torch.device("cpu")


def _digits_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                               torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(32, 10))


def test_training_on_the_cpu_leaves_idle_only_the_cores_torch_does_not_use(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    with torch_threads(8):
        assert cores_idle_while_training("cpu") == 0  # torch's default: a thread per core, nothing left to compile on
    with torch_threads(3):
        assert cores_idle_while_training("cpu") == 5
        assert cores_idle_while_training(torch.device("cuda", 0)) == 7  # the GPU computes; one core drives it


def test_finetuning_leaves_idle_only_the_cores_its_concurrent_trials_do_not_hold(monkeypatch):
    """The front compiles ahead on these cores while students finetune; on held cores it only slows the trials."""
    from eta.phases.finetune import idle_cores
    from eta.space import FinetuneConfig

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_cpu = FinetuneConfig(num_cpus=1)
    assert idle_cores(one_cpu, 3) == 13  # three trials at once, one core each
    assert idle_cores(one_cpu, 40) == 0  # more students than cores: every core trains
    assert idle_cores(one_cpu, 40, ray_cpus=4) == 12  # the local Ray node was given 4 CPUs
    assert idle_cores(FinetuneConfig(num_cpus=3), 40) == 1  # five trials of 3 fit in 16
    assert idle_cores(FinetuneConfig(num_cpus=2, workers=2), 3) == 4  # three students of two 2-CPU workers
    assert idle_cores(one_cpu, 0) == 16  # nothing left to finetune
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert idle_cores(FinetuneConfig(num_cpus=1, num_gpus=1), 40) == 14  # two GPUs: two trials at once
    assert idle_cores(FinetuneConfig(num_cpus=1, num_gpus=0.5), 40) == 12  # half a GPU each: four


@pytest.mark.gpu
@needs_gpu
def test_fit_and_evaluate_on_cuda_with_amp():
    from eta.augment import resolve
    from eta.data import load_splits
    from eta.train import evaluate, fit

    device = pick_device(1)
    assert device.type == "cuda" and amp_dtype(device) in (torch.bfloat16, torch.float16)
    s = load_splits("digits")
    model = _digits_model()
    before = evaluate(model, s.test, resolution=16, device=device)
    history = fit(model, s.train, epochs=3, lr=3e-3, weight_decay=0.0, batch_size=64, resolutions=[16], device=device,
                  augment=resolve("auto", "digits", 10), progress=False)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    on_gpu = evaluate(model, s.test, resolution=16, device=device)
    assert on_gpu > max(before, 0.5)
    assert abs(evaluate(model.cpu(), s.test, resolution=16) - on_gpu) < 0.01  # the same model on the CPU


@pytest.mark.gpu
@needs_gpu
def test_lazy_batches_reach_the_gpu_pinned(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from eta.data import batches, load_splits

    monkeypatch.setenv("ETA_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    lazy = load_splits("image_folder", root=str(tmp_path), decode_size=20, cache="none", workers=2)
    cached = load_splits("image_folder", root=str(tmp_path), decode_size=20, workers=0)
    device = pick_device(1)
    for (xa, ya), (xb, yb) in zip(batches(lazy.train, 4, resolution=16, device=device),
                                  batches(cached.train, 4, resolution=16)):
        assert xa.device.type == "cuda" and torch.allclose(xa.cpu(), xb, atol=1e-5) and torch.equal(ya.cpu(), yb)
