"""Data-parallel training over Ray Train workers: shards, gradient averaging, phase 3 with several workers.

Two workers at batch size b must train exactly what one process trains at 2b on the same seeded
pass (a network without BatchNorm, so the per-rank batch statistics cannot differ): that fails if
the shards overlap, if a rank's gradients are not averaged, or if the steps of the schedule differ.
"""
import pytest
import torch
from torch import nn

from eta.data import InMemoryImages, batches, num_batches, shard_batches
from eta.errors import EtaError
from eta.train import fit

from .conftest import IN_OWN_PROCESS, rerun_in_own_process


def images(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = (x.float().mean((1, 2, 3)) > 127.5).long() + 2 * (x[:, 0, 0, 0] > 127).long()
    return InMemoryImages(x, y, value_scale=255.0, mean=(0.5,), std=(0.25,))


def no_bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 4))


@pytest.mark.parametrize("total,world", [(10, 2), (11, 2), (7, 3), (3, 4)])
def test_shards_take_turns_cover_the_pass_once_and_are_equally_long(total, world):
    shards = [list(shard_batches(total, r, world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == total // world
    assert sorted(sum(shards, [])) == list(range(total - total % world))
    with pytest.raises(EtaError, match="rank 2 is not one of 2 workers"):
        shard_batches(total, 2, 2)


def test_a_shard_of_batches_is_the_same_batches_as_the_whole_pass():
    data = images(50)
    whole = list(batches(data, 8, shuffle=True, seed=3, drop_last=True))
    assert num_batches(data, 8, drop_last=True, world=2) == 3  # 6 batches, 3 each
    for rank in range(2):
        part = list(batches(data, 8, shuffle=True, seed=3, drop_last=True, shard=(rank, 2)))
        assert len(part) == 3
        for k, (x, y) in zip(range(rank, 6, 2), part):
            assert torch.equal(x, whole[k][0]) and torch.equal(y, whole[k][1])


def test_fit_data_parallel_outside_a_process_group_is_one_line():
    with pytest.raises(EtaError, match="process group"):
        fit(no_bn_net(), images(), epochs=1, lr=1e-2, weight_decay=0, batch_size=8, resolutions=[8], progress=False,
            data_parallel=True)


TRAIN = dict(epochs=2, lr=3e-2, weight_decay=0.01, resolutions=[8], seed=5, progress=False, amp="off")


@pytest.mark.parametrize("gpus", [0, pytest.param(1, marks=[pytest.mark.gpu, pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL gives each rank its own)")])], ids=["gloo-cpu", "nccl-gpu"])
def test_two_ray_train_workers_train_what_one_process_trains_at_twice_the_batch(request, tmp_path, gpus):
    if not IN_OWN_PROCESS:
        return rerun_in_own_process(request)
    request.getfixturevalue("ray_local")
    from eta.distributed import report, train_data_parallel, worker_rank

    data = images(96)

    def worker(config):
        rank = worker_rank()
        assert rank.device.type == ("cuda" if gpus else "cpu")
        model = no_bn_net()
        history = fit(model, data, batch_size=8, data_parallel=True, device=rank.device, **TRAIN)
        torch.save({"state": {k: v.cpu() for k, v in model.state_dict().items()}, "history": history},
                   f"{config['out']}/rank{rank.rank}.pt")
        report({"loss": history[-1]["train_loss"]})

    train_data_parallel(worker, {"out": str(tmp_path)}, workers=2, cpus_per_worker=1, gpus_per_worker=gpus,
                        storage=tmp_path / "ray", name="ddp-test")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    alone = no_bn_net()
    history = fit(alone, data, batch_size=16, **TRAIN)
    trained = False
    for name, w in alone.state_dict().items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), f"{name} differs between the ranks"
        torch.testing.assert_close(ranks[0]["state"][name], w, rtol=1e-4, atol=1e-5, msg=f"{name}: DDP differs from one process")
        trained |= not torch.allclose(w, no_bn_net().state_dict()[name])
    assert trained
    # the reported loss is over every rank's share: the one process's loss on the same images
    for a, b in zip(ranks[0]["history"], history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_students_start_only_as_many_worker_groups_as_the_cluster_holds_and_a_larger_group_is_one_line(ray_local):
    from eta.phases.finetune import worker_groups_held
    from eta.space import FinetuneConfig

    # the test cluster has 2 CPUs
    assert worker_groups_held(FinetuneConfig(workers=2, num_cpus=1)) == 1
    assert worker_groups_held(FinetuneConfig(workers=2, num_cpus=0.5)) == 2
    assert worker_groups_held(FinetuneConfig(workers=3, num_cpus=0.25)) == 2
    with pytest.raises(EtaError, match=r"finetune.workers: 3 workers of 1 CPU\(s\) each need 3 CPUs; the Ray cluster has 2"):
        worker_groups_held(FinetuneConfig(workers=3, num_cpus=1))
    with pytest.raises(EtaError, match=r"2 workers of 1 GPU\(s\) each need 2 GPUs; the Ray cluster has 0"):
        worker_groups_held(FinetuneConfig(workers=2, num_cpus=1, num_gpus=1))
