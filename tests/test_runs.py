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
