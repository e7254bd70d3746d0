"""The whole search on a tiny digits space: every phase really runs, resumes, and exports.

These tests fail if any phase is replaced by a stub: the teacher must beat chance, phase-1
losses must fall, the predictor must be fitted on measured proxy accuracies, solutions must meet
their budgets by the latency table, finetuned students must beat chance on the test split, and
latencies must be real TVM measurements of the exported networks.
"""
import json
import logging
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from eta.accuracy_predictor import MLPPredictor, spearman
from eta.errors import EtaError
from eta.phases.solve import encode
from eta.pipeline import Search
from eta.space import parse_space
from eta.threads import torch_threads

from .conftest import IN_OWN_PROCESS, rerun_in_own_process, tiny_space_dict


@pytest.fixture(scope="module")
def search_log():
    """What eta's loggers say while this module's tests run, in order (the search of ``finished`` first)."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger, level = logging.getLogger("eta"), logging.getLogger("eta").level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ray_local, search_log):
    runs = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ETA_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))  # empty: this search compiles all it times
        space = parse_space(tiny_space_dict())
        search = Search(space, runs_dir=runs, progress=False)
        t0 = time.time()
        with torch_threads(1):  # the teacher trains on one core and leaves the others to compile the table
            pareto = search.run_all()
        yield search, pareto, time.time() - t0


def test_phases_do_real_work(finished):
    search, pareto, wall = finished
    run = search.run
    teacher = run.phase_info("teacher")
    assert teacher["test_acc"]["16"] > 0.6  # 10 classes: chance is 0.1
    p1 = json.loads(run.pretrain_metrics.read_text())
    assert len(p1) == search.bound.num_blocks
    for b, m in p1.items():
        if "loss_last" in m:
            assert m["loss_last"] < m["loss_first"], f"block {b}: distillation loss did not fall"
            assert all(np.isfinite(v) for v in m["candidates"].values())
    pred = json.loads(run.predictor_metrics.read_text())
    samples = json.loads(run.samples.read_text())
    accs = [s["proxy_acc"] for s in samples]
    assert len(set(accs)) > 1, "proxy accuracies must vary between stitched students"
    # the recorded Spearman is the saved predictor's, on the samples it held out
    model = MLPPredictor.load(run.predictor_weights)
    # samples.json lists students in the order their proxy accuracies came back, so the split is checked by content
    proxy = {tuple(s["choices"]): s["proxy_acc"] for s in samples}
    held = [{"choices": c, "proxy_acc": proxy[tuple(c)]} for c in pred["holdout"]["choices"]]
    assert len({tuple(h["choices"]) for h in held}) == pred["n_holdout"] and pred["holdout"]["proxy_acc"] == [h["proxy_acc"] for h in held]
    # float32 sums in another order (threads, memory alignment) move predictions by an ulp and can swap two near-equal
    # ones, so the ranks are checked on the recorded predictions and the predictions against the saved predictor
    assert model.predict(encode(search.bound, [h["choices"] for h in held])) == pytest.approx(pred["holdout"]["predicted"], abs=1e-5)
    assert pred["spearman_holdout"] == pytest.approx(spearman(pred["holdout"]["predicted"], pred["holdout"]["proxy_acc"]), abs=1e-9)
    assert pred["n_train"] + pred["n_holdout"] == len(samples)
    sols = json.loads(run.solutions.read_text())
    assert sols
    for s in sols:
        assert s["predicted_latency_ms"] <= s["budget_ms"] * (1 + 1e-6)
    for p in pareto["all"]:
        assert p["test_acc"] > 0.3 and p["latency_ms"] > 0


def test_the_table_compiles_while_the_teacher_trains(finished, search_log):
    """Every module the latency phase times was compiled on the core the teacher's training left idle, in a round
    started before it: the phase's own compile rounds find nothing left to compile (they log how many they do)."""
    said = [r.getMessage() for r in search_log]
    training = next(i for i, m in enumerate(said) if m.startswith("teacher: training"))
    pretrain = next(i for i, m in enumerate(said) if m.startswith("pretrain:"))
    assert any("modules ahead" in m for m in said[:training])
    assert [m for m in said[training:pretrain] if m.startswith("compiling:")] == []
    assert any(m.startswith("latency table:") for m in said[training:pretrain])


def test_front_is_pareto_and_measured(finished):
    search, pareto, _ = finished
    front = pareto["front"]
    assert front and (search.run.root / "pareto.png").stat().st_size > 5000
    lat = [p["latency_ms"] for p in front]
    acc = [p["test_acc"] for p in front]
    assert lat == sorted(lat) and acc == sorted(acc), "front must trade latency for accuracy"
    def beats(q, p):
        return q["latency_ms"] <= p["latency_ms"] and q["test_acc"] >= p["test_acc"] and (q["latency_ms"], q["test_acc"]) != (p["latency_ms"], p["test_acc"])

    for p in pareto["all"]:  # on the front exactly when nothing beats it (of identical points, one is on the front)
        dominated = any(beats(q, p) for q in pareto["all"])
        if p in front:
            assert not dominated, p
        else:
            assert dominated or any((q["latency_ms"], q["test_acc"]) == (p["latency_ms"], p["test_acc"]) for q in front), p
    assert {p["resolution"] for p in pareto["all"]} == {12, 16}
    assert all(p["params"] > 0 and p["size_mb"] > 0 and p["bops_g"] > 0 for p in front)


def test_wandb_offline_runs_hold_every_phase(finished):
    """One group per search, a run per phase, the frozen space as config, the metrics, the front and the students."""
    from .wandb_records import summarize

    search, pareto, _ = finished
    runs = [summarize(r) for r in sorted((search.run.root / "wandb").glob("offline-run-*"))]
    by_job = {r["job_type"]: r for r in runs}
    assert {"teacher", "latency", "pretrain", "solve", "finetune"} <= set(by_job)
    assert {r["group"] for r in runs} == {search.run.root.name}
    assert {"teacher", "pool", "budgets", "pretrain", "solve", "finetune"} <= by_job["solve"]["config"]
    assert any(k.startswith("pretrain/block") for k in by_job["pretrain"]["history"])  # distillation loss per block and candidate
    assert {"solve/predictor_spearman", "solve/solver_s"} <= by_job["solve"]["history"]
    trials = [r for r in runs if r["job_type"].startswith("finetune-")]
    assert trials and all({"finetune/train_loss", "finetune/epoch"} <= r["history"] for r in trials)  # finetune curves
    final = by_job["finetune"]
    assert any(k.startswith("pareto/front") for k in final["history"])
    assert any(f.startswith("files/media/images/pareto") for f in final["files"])
    students = {p["id"] for p in pareto["front"]}
    arts = {a["name"]: a for a in final["artifacts"] if a["type"] == "model"}
    assert set(arts) == {f"{search.run.root.name}-{sid}" for sid in students}
    assert all(any(f.endswith("weights.safetensors") for f in a["files"]) and '"arch"' in a["metadata"] for a in arts.values())


def test_resume_redoes_nothing(finished):
    search, pareto, _ = finished
    files = sorted(search.run.pretrain_dir.glob("*.safetensors")) + [search.run.pareto_json]
    before = {f: f.stat().st_mtime_ns for f in files}
    again = Search(parse_space(tiny_space_dict()), runs_dir=search.run.root.parent, progress=False)
    t0 = time.time()
    out = again.run_all()
    assert time.time() - t0 < 60
    assert out["front"] == pareto["front"]
    assert before == {f: f.stat().st_mtime_ns for f in files}


def test_remeasure_keeps_the_students_and_rebuilds_the_front_from_the_table(finished):
    search, pareto, _ = finished
    weights = sorted(search.run.finetune_dir.rglob("*.safetensors"))
    before = {f: f.stat().st_mtime_ns for f in weights}
    original = search.run.pareto_json.read_text()
    stale = json.loads(original)
    for p in stale["all"] + stale["front"]:
        p["latency_ms"] = 999.0
    search.run.pareto_json.write_text(json.dumps(stale))
    try:
        again = Search(parse_space(tiny_space_dict()), runs_dir=search.run.root.parent, progress=False)
        out = again.phase("finetune", remeasure=True)
    finally:  # the other tests of the module read the run's front as the fixture left it
        search.run.pareto_json.write_text(original)
    assert [(p["id"], p["resolution"]) for p in out["all"]] == [(p["id"], p["resolution"]) for p in pareto["all"]]
    # each network's latency from the table again: the same figure, or one measured afresh where the table's drift
    # check found this machine slower or faster than when it timed them
    assert all(1 / 3 < p["latency_ms"] / q["latency_ms"] < 3 for p, q in zip(out["all"], pareto["all"]))
    assert [p["test_acc"] for p in out["all"]] == [p["test_acc"] for p in pareto["all"]]
    assert weights and before == {f: f.stat().st_mtime_ns for f in weights}  # no student trained again


def test_new_finetune_settings_finetune_the_students_again_but_more_students_keep_them(finished, tmp_path):
    search, pareto, _ = finished
    shutil.copytree(search.run.root, tmp_path / search.run.root.name)
    d = tiny_space_dict()
    d["finetune"]["max_students"] += 1  # where the work runs or how many: the students stay
    out = Search(parse_space(d), runs_dir=tmp_path, progress=False).phase("finetune")
    kept = {p["id"]: p["test_acc"] for p in pareto["all"]}
    assert kept.items() <= {p["id"]: p["test_acc"] for p in out["all"]}.items()
    d["finetune"]["epochs"] = 1  # how they are trained: every student again, under the new recipe
    Search(parse_space(d), runs_dir=tmp_path, progress=False).phase("finetune")
    for sid in kept:
        metrics = json.loads((tmp_path / search.run.root.name / "finetune" / sid / "metrics.json").read_text())
        assert len(metrics["history"]) == 1 and metrics["recipe"]


def test_each_lower_resolution_has_its_own_batchnorm_statistics(finished, tmp_path):
    """A student at 12 px is the one finetuned (last at 16 px) with BatchNorm statistics re-estimated at 12 px: the
    front's point loads those weights and has their accuracy; an older run gets them on --remeasure without training,
    and resolution_bn_batches 0 goes back to the 16-px statistics."""
    from eta.export import build_student
    from eta.files import load_tensors
    from eta.runs import Run
    from eta.train import evaluate

    search, pareto, _ = finished
    low = [p for p in pareto["all"] if p["resolution"] == 12]
    assert low
    for p in low:
        own = load_tensors(search.run.root / p["weights"])
        top = load_tensors(search.run.student_weights(p["id"]))
        assert p["weights"].endswith("weights_12px.safetensors") and own.keys() == top.keys()
        stats = [k for k in own if k.endswith(("running_mean", "running_var"))]
        assert stats and all(torch.equal(own[k], top[k]) for k in own if k not in stats and not k.endswith("num_batches_tracked"))
        assert any(not torch.allclose(own[k], top[k]) for k in stats)
        assert evaluate(build_student(search.run, p), search.splits.test, resolution=12) == pytest.approx(p["test_acc"], abs=1e-9)
    # a run finetuned before per-resolution statistics: --remeasure adds them from the saved weights
    root = tmp_path / search.run.root.name
    shutil.copytree(search.run.root, root)
    for f in root.glob("finetune/*/weights_12px.safetensors"):
        f.unlink()
    for f in root.glob("finetune/*/metrics.json"):
        m = json.loads(f.read_text())
        m.pop("bn_resolutions"), m.pop("resolution_bn_batches")
        f.write_text(json.dumps(m))
    trained = {f: f.read_bytes() for f in root.glob("finetune/*/weights.safetensors")}
    out = Search(parse_space(tiny_space_dict()), runs_dir=tmp_path, progress=False).phase("finetune", remeasure=True)
    assert {f: f.read_bytes() for f in trained} == trained  # nothing trained again
    by_point = {(p["id"], p["resolution"]): p for p in out["all"]}
    for p in low:
        again = by_point[(p["id"], 12)]
        assert again["weights"] == p["weights"] and again["test_acc"] == pytest.approx(p["test_acc"], abs=0.01)
        fresh, first = load_tensors(root / again["weights"]), load_tensors(search.run.root / p["weights"])
        assert all(torch.allclose(fresh[k], first[k], atol=1e-4) for k in first)
    d = tiny_space_dict()
    d["finetune"]["resolution_bn_batches"] = 0
    out = Search(parse_space(d), runs_dir=tmp_path, progress=False).phase("finetune")
    assert {f: f.read_bytes() for f in trained} == trained and not list(root.glob("finetune/*/weights_12px.safetensors"))
    for p in (p for p in out["all"] if p["resolution"] == 12):
        assert p["weights"].endswith("/weights.safetensors")
        assert evaluate(build_student(Run.open(root), p), search.splits.test, resolution=12) == pytest.approx(p["test_acc"], abs=1e-9)


def test_export_and_load_student(finished, tmp_path):
    import eta
    from eta.export import export_student, load_exported
    from eta.train import evaluate

    search, pareto, _ = finished
    best = max(pareto["front"], key=lambda p: p["test_acc"])
    model = eta.load_student(search.run.root, max_latency_ms=best["latency_ms"])
    assert isinstance(model, torch.nn.Module)
    acc = evaluate(model, search.splits.test, resolution=model.eta_info["resolution"])
    assert acc == pytest.approx(model.eta_info["test_acc"], abs=1e-9)
    meta = export_student(search.run.root, tmp_path / "out", max_latency_ms=best["latency_ms"])
    plain = load_exported(tmp_path / "out")
    x = torch.randn(4, 1, meta["resolution"], meta["resolution"])
    assert torch.allclose(plain(x), model(x), atol=1e-5)
    # the same student for ONNX runtimes, and compiled by TVM as the table measured it
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "student.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.allclose(onnx_out, model(x).detach().numpy(), atol=1e-4)
    from eta.latency.deploy import load_exported_library

    deployed = meta["deployed"]
    library = load_exported_library(tmp_path / "out" / "student.so")
    one = x[:1].numpy()
    assert np.allclose(library(one), model(x[:1]).detach().numpy(), atol=1e-4)
    assert deployed["schedule"] == search.space.latency.schedules == "untuned"
    # timed again, as written (not the front's figure copied); the bound is loose, this VM's speed drifts by 1.5x
    assert deployed["latency_ms"] != deployed["front_latency_ms"] and 1 / 3 < deployed["latency_ms"] / deployed["front_latency_ms"] < 3
    run = subprocess.run([sys.executable, "run_student.py"], cwd=tmp_path / "out", capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "predicted classes" in run.stdout, run.stderr[-2000:]
    with pytest.raises(EtaError, match="fastest"):
        export_student(search.run.root, tmp_path / "out2", max_latency_ms=1e-6)


def test_infeasible_budget_stops_before_training(tmp_path, ray_local, finished):
    search, _, _ = finished
    d = tiny_space_dict(budgets=[0.01])
    # reuse the finished run's teacher so only the budget check runs
    d["teacher"]["checkpoint"] = str(search.teacher_path)
    s = Search(parse_space(d), runs_dir=tmp_path, progress=False)
    with pytest.raises(EtaError, match=r"infeasible.*fastest student of this space takes [0-9.]+ ms"):
        s.run_all()
    assert not s.run.pretrain_dir.exists()


def test_headline_benchmark_runs_every_baseline_and_a_second_backend_trains_nothing_again(finished, tmp_path, monkeypatch):
    from benchmarks import headline

    search, _, _ = finished
    # one variant per importance and per scope keeps the test short; the benchmark runs all four
    monkeypatch.setattr(headline, "TP_VARIANTS", [("magnitude", "uniform"), ("taylor", "global")])
    out = tmp_path / "measurements"
    args = [str(search.run.root), "--baselines", "width", "resolution", "tp", "--widths", "0.5", "--targets", "1", "--out", str(out)]
    assert headline.main(args + ["--backend", "torch"]) == 0
    torch_table = json.loads((out / f"headline-{search.run.root.name}-torch.json").read_text())
    rows = {r["method"]: r for r in torch_table["baselines"]}
    assert {"width-0.5", "resolution-12", "teacher"} <= set(rows)
    pruned = [r for m, r in rows.items() if m.startswith("tp-")]
    assert sorted(r["method"].rsplit("-", 1)[0] for r in pruned) == ["tp-magnitude-uniform", "tp-taylor-global"]  # one target each
    teacher_params = sum(p.numel() for p in search.bound.teacher.parameters())
    assert all(r["params"] < teacher_params for r in pruned + [rows["width-0.5"]])
    assert all(r["latency_ms"] > 0 and 0.1 < r["test_acc"] <= 1 for r in rows.values())
    assert all(r["method"] == "teacher" or r["gain"] is not None or r["speedup"] is not None or r["eta_acc"] is None
               for r in rows.values())

    # the same run on TVM measures the very models trained above: nothing is trained again
    monkeypatch.setattr(headline, "fit", lambda *a, **k: pytest.fail("a baseline was trained again"))
    assert headline.main(args + ["--backend", "tvm"]) == 0
    tvm_rows = {r["method"]: r for r in json.loads((out / f"headline-{search.run.root.name}-tvm.json").read_text())["baselines"]}
    assert set(tvm_rows) == set(rows)
    assert all(tvm_rows[m]["test_acc"] == rows[m]["test_acc"] for m in rows)
    assert all(tvm_rows[m]["latency_ms"] != rows[m]["latency_ms"] for m in rows)  # measured again, on the other runtime
    assert (out.parent / "figures" / f"headline-{search.run.root.name}-tvm.png").stat().st_size > 0

    # a baseline trained for another budget (the run's epochs changed since) is trained again, and only it
    kept = search.run.benchmarks_dir / "headline" / "models" / "resolution-12.json"
    kept.write_text(json.dumps({**json.loads(kept.read_text()), "epochs": 99}))
    trained = []
    monkeypatch.setattr(headline, "fit", lambda model, *a, epochs, **k: trained.append(epochs))
    assert headline.main(args + ["--backend", "torch"]) == 0
    budget = search.space.pretrain.epochs + search.space.finetune.epochs
    assert trained == [budget] and json.loads(kept.read_text())["epochs"] == budget


@pytest.mark.slow
def test_finetune_with_two_data_parallel_workers_per_student_trains_and_saves_it(request, tmp_path):
    from eta.phases import finetune
    from eta.phases.context import PhaseContext
    from eta.runs import Run

    if not IN_OWN_PROCESS:
        return rerun_in_own_process(request)
    search, _, _ = request.getfixturevalue("finished")
    root = tmp_path / search.run.root.name
    shutil.copytree(search.run.root, root)
    space_dict = search.space.to_dict()
    ft = search.space.finetune  # two workers at half the batch: the steps one process took in the fixture
    space_dict["finetune"] |= {"workers": 2, "batch_size": ft.batch_size // 2}
    space = parse_space(space_dict)
    run = Run(root)
    arch = json.loads(run.solutions.read_text())[0]["arch"]
    sid = finetune.student_id(arch)
    run.student_metrics(sid).unlink()
    before = run.student_weights(sid).read_bytes()
    alone = json.loads(search.run.student_metrics(sid).read_text())
    ctx = PhaseContext(space, search.bound, search.splits, run, progress=False)
    # a second student in the same Ray session: its workers used to wait for ever on the first one's CPUs
    other = next(s["arch"] for s in json.loads(run.samples.read_text()) if s["arch"] != arch)
    run.student_metrics(finetune.student_id(other)).unlink(missing_ok=True)
    metrics, second = finetune.finetune_all(ctx, [arch, other])
    assert metrics["workers"] == second["workers"] == 2 and len(metrics["history"]) == len(second["history"]) == ft.epochs
    assert second["test_acc"][str(space.data.resolution)] > 0.3
    res = str(space.data.resolution)  # as accurate as the student one process trained (BatchNorm statistics differ per rank)
    assert metrics["test_acc"][res] > 0.5 and abs(metrics["test_acc"][res] - alone["test_acc"][res]) < 0.1
    assert run.student_weights(sid).read_bytes() != before  # rank 0 saved the student the two workers trained
