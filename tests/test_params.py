from pathlib import Path

import pytest

from touchvl.params import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_yaml_loads_and_matches_defaults_types():
    params = load_params(ROOT / "params.yaml")
    assert params.data.root == Path("data/sample")
    assert params.prepare.augment.copies >= 0
    assert isinstance(params.prepare.max_image_pixels, int)


def test_params_yaml_prices_are_the_schema_default():
    """One price table: params.yaml's jsonl.prices_per_million is the schema default (what `touchvl validate` prices
    with outside a project), so a file costs the same inside and outside the project."""
    import yaml

    from touchvl.chat.prices import DEFAULT_PRICES
    from touchvl.params import JsonlParams

    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert raw["jsonl"]["prices_per_million"] == JsonlParams().prices_per_million == DEFAULT_PRICES
    assert len(DEFAULT_PRICES) > 1 and raw["jsonl"]["model"] == JsonlParams().model in DEFAULT_PRICES


def test_unknown_key_fails_with_dotted_name():
    with pytest.raises(ParamsError, match=r"unknown key 'prepare\.augment\.copise'"):
        parse_params({"prepare": {"augment": {"copise": 3}}})


def test_unknown_section_fails():
    with pytest.raises(ParamsError, match=r"unknown key 'prepar'"):
        parse_params({"prepar": {}})


def test_wrong_type_fails_with_dotted_name():
    with pytest.raises(ParamsError, match=r"'sample\.n_ids'"):
        parse_params({"sample": {"n_ids": "many"}})


def test_out_of_range_and_cross_field_checks():
    with pytest.raises(ParamsError, match=r"'prepare\.max_bad_fraction'"):
        parse_params({"prepare": {"max_bad_fraction": 1.5}})
    with pytest.raises(ParamsError, match=r"crop_scale"):
        parse_params({"prepare": {"augment": {"crop_scale": [0.9, 0.5]}}})


def test_every_error_is_reported_at_once():
    with pytest.raises(ParamsError) as info:
        parse_params({"sample": {"n_ids": "x", "seeed": 1}})
    assert "sample.n_ids" in str(info.value) and "sample.seeed" in str(info.value)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
