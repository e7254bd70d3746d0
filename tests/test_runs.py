"""Run directories: atomic writes, resume with the same space, refusal to overwrite without --force."""

import pytest
import torch

from eta.errors import EtaError
from eta.files import atomic_path, load_tensors, read_json, save_tensors, write_json
from eta.runs import Run
from eta.space import parse_space


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "x.json"
    write_json(p, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert read_json(p) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]


def test_resume_same_space_and_refuse_different(tmp_path, digits_space_dict):
    space = parse_space(digits_space_dict)
    run = Run.create_or_resume(tmp_path, space)
    run.mark_done("teacher", inputs="abc")
    again = Run.create_or_resume(tmp_path, space)
    assert again.is_done("teacher", "abc") and not again.is_done("teacher", "other")
    digits_space_dict["pretrain"]["epochs"] = 9
    other = parse_space(digits_space_dict)
    with pytest.raises(EtaError, match="--force"):
        Run.create_or_resume(tmp_path, other)
    assert run.is_done("teacher")  # nothing was touched
    forced = Run.create_or_resume(tmp_path, other, force=True)
    assert not forced.is_done("teacher")


def test_new_budgets_resume_the_run(tmp_path, digits_space_dict):
    run = Run.create_or_resume(tmp_path, parse_space(digits_space_dict))
    run.mark_done("pretrain")
    digits_space_dict["budgets"] = [0.3]
    again = Run.create_or_resume(tmp_path, parse_space(digits_space_dict))
    assert again.is_done("pretrain") and again.space().budgets == [0.3]


def test_corrupt_weights_and_json_are_one_line_errors(tmp_path):
    w = tmp_path / "w.safetensors"
    save_tensors(w, {"a": torch.ones(3)})
    assert torch.equal(load_tensors(w)["a"], torch.ones(3))
    w.write_bytes(w.read_bytes()[:20])
    with pytest.raises(EtaError, match="corrupt weights"):
        load_tensors(w)
    j = tmp_path / "m.json"
    j.write_text("{not json")
    with pytest.raises(EtaError, match="corrupt JSON"):
        read_json(j)
    with pytest.raises(EtaError, match="not an eta run"):
        Run.open(tmp_path)


def test_a_run_of_the_previous_format_resumes_without_redoing_anything(tmp_path):
    """A run written by eta before the phases had one name (folders phase1/2/3, sections phase1/2/3) is
    migrated when opened: every finished phase stays finished, nothing is recomputed, its student loads."""
    import shutil

    import eta
    from eta.pipeline import Search
    from eta.runs import FORMAT, PHASES
    from eta.train import evaluate

    from .conftest import REPO

    root = tmp_path / "runs" / "format1"
    shutil.copytree(REPO / "tests" / "fixtures" / "runs" / "format1", root)
    old_front = read_json(root / "pareto.json")["front"]
    weights = sorted(p for p in root.rglob("*.safetensors"))
    run = Run.open(root)
    assert run.manifest()["format"] == FORMAT
    assert not any((root / f"phase{i}").exists() for i in (1, 2, 3)) and run.pretrain_dir.is_dir() and run.finetune_dir.is_dir()
    assert "phase1:" not in run.space_path.read_text() and "pretrain:" in run.space_path.read_text()
    mtimes = {p.relative_to(root).as_posix().replace("phase1/", "pretrain/").replace("phase3/", "finetune/"): p
              for p in weights}
    mtimes = {k: (root / k).stat().st_mtime_ns for k in mtimes}
    search = Search(run.space(), runs_dir=root.parent, name="format1", progress=False)
    assert all(search.done(p) for p in PHASES), run.manifest()["phases"]
    pareto = search.run_all()
    search.close()
    assert [(p["arch"], p["resolution"], p["latency_ms"]) for p in pareto["front"]] == \
        [(p["arch"], p["resolution"], p["latency_ms"]) for p in old_front]
    assert {k: (root / k).stat().st_mtime_ns for k in mtimes} == mtimes  # nothing trained again
    model = eta.load_student(root)
    acc = evaluate(model, search.splits.test, resolution=model.eta_info["resolution"])
    assert acc == pytest.approx(model.eta_info["test_acc"], abs=1e-9)
    Run.open(root)  # opening a current run again changes nothing
    assert run.manifest()["format"] == FORMAT


def test_new_solve_and_finetune_settings_resume_the_run_and_only_their_phases_are_stale(tmp_path, digits_space_dict):
    from eta.runs import phase_inputs

    space = parse_space(digits_space_dict)
    run = Run.create_or_resume(tmp_path, space)
    for phase in ("pretrain", "solve", "finetune"):
        run.mark_done(phase, inputs=phase_inputs(space, phase))
    digits_space_dict["finetune"]["max_students"] = 11
    more = parse_space(digits_space_dict)
    again = Run.create_or_resume(tmp_path, more)
    assert again.space().finetune.max_students == 11
    assert again.is_done("pretrain", phase_inputs(more, "pretrain")) and again.is_done("solve", phase_inputs(more, "solve"))
    assert not again.is_done("finetune", phase_inputs(more, "finetune"))
    assert read_json(again.manifest_path)["space_fingerprint"] == more.fingerprint()
    digits_space_dict["pretrain"]["epochs"] = 9  # an earlier phase's setting still needs a new run or --force
    with pytest.raises(EtaError, match="--force"):
        Run.create_or_resume(tmp_path, parse_space(digits_space_dict))
