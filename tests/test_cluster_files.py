"""cluster/: the launcher config, the KubeRay job and the runtime env parse, and install/run eta."""
import yaml

from .conftest import REPO


def test_launcher_installs_eta_and_has_gpu_workers():
    cfg = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    assert any("pip install" in c and "eta" in c for c in cfg["setup_commands"])
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert any(t.get("resources", {}).get("GPU", 0) >= 1 for t in types.values())
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])


def test_rayjob_runs_eta_search():
    job = yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"].startswith("ray.io/")
    assert job["spec"]["entrypoint"].startswith("eta search ") and "--address auto" in job["spec"]["entrypoint"]
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    space = job["spec"]["entrypoint"].split()[2]
    assert (REPO / space).exists()


def test_runtime_env_installs_eta():
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert "-e ." in env["pip"]["packages"] and env["env_vars"]["WANDB_MODE"] == "offline"
