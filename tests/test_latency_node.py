"""Latency measured on the Ray node that holds a target's custom resource (an edge device joining the cluster)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path

    import ray
    from ray.cluster_utils import Cluster
    from torch import nn

    from eta.latency.protocol import Protocol
    from eta.latency.table import LatencyTable
    from eta.latency.measurer import Measurer, describe_target

    out = Path(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    board = cluster.add_node(num_cpus=1, resources={"latency:board": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        target, device = ray.get(ray.remote(describe_target).options(num_cpus=0, resources={"latency:board": 0.001}).remote("tvm", "llvm"))
        backend = Measurer("tvm", target, device, Protocol(repeat=3, min_repeat_ms=1.0, max_slowdown=None), "untuned", "latency:board")
        table = LatencyTable.open(out / "t.json", backend="tvm", target=target, device=device, protocol=backend.protocol)
        items = [(f"conv{c}", (lambda c=c: nn.Sequential(nn.Conv2d(4, c, 3, padding=1), nn.ReLU())), (1, 4, 8, 8), 32) for c in (4, 8)]
        table.measure_many(items, progress=False, executor=backend.executor())
        nodes = [table.entry(s, sh, b).get("ray_node") for s, _, sh, b in items]
        json.dump({"board": board.node_id, "driver": ray.get_runtime_context().get_node_id(), "nodes": nodes,
                   "ms": [table.get(s, sh, b) for s, _, sh, b in items]}, open(out / "result.json", "w"))
    finally:
        ray.shutdown()
        cluster.shutdown()
''')


def test_entries_are_measured_on_the_node_with_the_latency_resource(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["nodes"] == [res["board"], res["board"]]  # both entries measured on the board node
    assert res["board"] != res["driver"]
    assert all(ms and ms > 0 for ms in res["ms"])


def test_missing_latency_node_is_a_one_line_error(ray_local):
    from eta.errors import EtaError
    from eta.phases.latency import measurer
    from eta.space import parse_space

    from .conftest import tiny_space_dict

    d = tiny_space_dict()
    d["latency"]["node_resource"] = "latency:nowhere"
    space = parse_space(d, "test")
    with pytest.raises(EtaError, match="no node of the Ray cluster has resource 'latency:nowhere'"):
        measurer(space)


def test_tuning_nodes_that_no_node_holds_is_a_one_line_error(ray_local):
    from eta.errors import EtaError
    from eta.phases.latency import measurer, tune
    from eta.space import parse_space

    from .conftest import tiny_space_dict

    d = tiny_space_dict()
    d["latency"]["schedules"] = "tuned"
    d["latency"]["tune"] = {"nodes": "tune:nowhere"}
    space = parse_space(d, "test")
    with pytest.raises(EtaError, match="no node of the Ray cluster holds the resource 'tune:nowhere'") as err:
        tune(space, measurer(space), None, [], name="test")
    assert "\n" not in str(err.value)
