"""Search spaces: valid spaces load; every kind of bad input is one clear EtaError line."""
import pytest
import yaml

from eta.arch import OpSpec, arch_from_str, arch_to_str
from eta.errors import EtaError
from eta.space import Budget, load_space, parse_space

from .conftest import REPO


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_spaces_validate(path):
    space = load_space(path)
    assert space.op_specs(), "a space must offer operators"
    assert space.parsed_budgets()


def test_malformed_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\npool: [\n  - {family: ir\n")
    with pytest.raises(EtaError) as e:
        load_space(p)
    msg = str(e.value)
    assert "malformed YAML" in msg and str(p) in msg and "line" in msg and "\n" not in msg


def test_unknown_operator_names_field(digits_space_dict):
    digits_space_dict["pool"][1]["family"] = "wavelet"
    with pytest.raises(EtaError) as e:
        parse_space(digits_space_dict, "s.yaml")
    msg = str(e.value)
    assert "pool.1.family" in msg and "wavelet" in msg


def test_unknown_key_rejected(digits_space_dict):
    digits_space_dict["pretrain"]["epochz"] = 3
    with pytest.raises(EtaError, match="pretrain.epochz"):
        parse_space(digits_space_dict)


def test_missing_space_file(tmp_path):
    with pytest.raises(EtaError, match="not found"):
        load_space(tmp_path / "nope.yaml")


@pytest.mark.parametrize("raw,ms", [(0.5, 5.0), ("2.5ms", 2.5), ("0.25", 2.5)])
def test_budgets(raw, ms):
    assert Budget.parse(raw).to_ms(10.0) == pytest.approx(ms)


@pytest.mark.parametrize("raw", [7, "fast", -0.2])
def test_bad_budgets(raw):
    with pytest.raises(EtaError):
        Budget.parse(raw)


def test_bad_budget_in_space(digits_space_dict):
    digits_space_dict["budgets"] = [0.5, "soon"]
    with pytest.raises(EtaError, match="budgets"):
        parse_space(digits_space_dict)


def test_fingerprint_ignores_budgets_not_pool(digits_space_dict):
    a = parse_space(digits_space_dict)
    d = dict(digits_space_dict, budgets=[0.3])
    assert parse_space(d).fingerprint() == a.fingerprint()
    d2 = yaml.safe_load(yaml.safe_dump(digits_space_dict))
    d2["pool"] = d2["pool"][:2]
    assert parse_space(d2).fingerprint() != a.fingerprint()


def test_arch_strings_round_trip():
    arch = (OpSpec("ir", 3, 6.0), OpSpec("identity"), OpSpec("basic", 3, 0.5, bits=8), OpSpec("teacher"), OpSpec("vit", 0, 2.0, heads=4))
    s = arch_to_str(arch)
    assert s == "ir_k3_e6-id-basic_k3_e0.5_w8-teacher-vit_h4_e2"
    assert arch_from_str(s) == arch
    with pytest.raises(EtaError):
        arch_from_str("ir_k3_e6-conv??")


def test_settings_at_their_default_do_not_change_hashes(digits_space_dict):
    """Adding a defaulted setting to eta must not make existing runs look like different searches."""
    from eta.space import parse_space

    plain = parse_space(digits_space_dict, "test")
    explicit = dict(digits_space_dict, latency={**digits_space_dict["latency"], "torch_compile": False, "tune_trials": 0})
    explicit = parse_space(explicit, "test")
    assert plain.fingerprint() == explicit.fingerprint()
    assert plain.section_hash(include=("latency",)) == explicit.section_hash(include=("latency",))
    changed = parse_space(dict(digits_space_dict, latency={**digits_space_dict["latency"], "tune_trials": 8}), "test")
    assert changed.section_hash(include=("latency",)) != plain.section_hash(include=("latency",))
