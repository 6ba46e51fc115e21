"""Values that parse but cannot work fail in the schema, naming the dotted key -- not deep inside a stage."""
import pytest

from touchvl.params import ParamsError, parse_params


def _fails(raw: dict, key: str, *also: str) -> str:
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    message = str(info.value)
    assert f"'{key}'" in message, message
    for text in also:
        assert text in message, message
    assert "Traceback" not in message
    return message


def test_projector_dim_must_divide_into_heads():
    _fails({"projector": {"dim": 130, "heads": 4}}, "projector.heads", "projector.dim=130", "4")
    assert parse_params({"projector": {"dim": 132, "heads": 4}}).projector.heads == 4


@pytest.mark.parametrize("key", ["embed", "projector"])
@pytest.mark.parametrize("device", ["tpu", "cuda:", "cuda:x", "CPU", " cpu", "cuda:0:1", "", "mps:0"])
def test_device_names_are_checked(key, device):
    _fails({key: {"device": device}}, f"{key}.device", "auto, cpu, cuda, cuda:N or mps")


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_good_device_names_parse(device):
    params = parse_params({"embed": {"device": device}, "projector": {"device": device}})
    assert params.embed.device == params.projector.device == device


def test_local_finetune_device_is_checked_too():
    _fails({"finetune": {"local": {"device": "tpu"}}}, "finetune.local.device")
    # the local trainer compares the device with "cuda" and autocasts on it: an index would pass here and
    # break there, so it is refused here
    _fails({"finetune": {"local": {"device": "cuda:1"}}}, "finetune.local.device")


@pytest.mark.parametrize("intents, key", [
    ([], "jsonl.intents"),
    (["describe", "smell"], "jsonl.intents.1"),
    (["describe", "describe"], "jsonl.intents"),
    ("describe", "jsonl.intents"),
])
def test_jsonl_intents_are_a_non_empty_subset_without_repeats(intents, key):
    _fails({"jsonl": {"intents": intents}}, key)


def test_jsonl_intents_subset_parses():
    assert parse_params({"jsonl": {"intents": ["material", "describe"]}}).jsonl.intents == ("material", "describe")


@pytest.mark.parametrize("section", ["jsonl", "finetune"])
@pytest.mark.parametrize("value", [0, -3, "many"])
def test_n_epochs_is_auto_or_positive(section, value):
    _fails({section: {"n_epochs": value}}, f"{section}.n_epochs")


@pytest.mark.parametrize("section", ["jsonl", "finetune"])
def test_n_epochs_good_values(section):
    assert getattr(parse_params({section: {"n_epochs": 3}}), section).n_epochs == 3
    assert getattr(parse_params({section: {"n_epochs": "auto"}}), section).n_epochs == "auto"


@pytest.mark.parametrize("prefix", ["../x/", "tvl/../../etc/", "..", "/abs/", "tvl\\x/", "a/./b/", "tvl/\x00/"])
def test_upload_prefix_cannot_leave_local_dir(prefix):
    _fails({"upload": {"prefix": prefix}}, "upload.prefix")


@pytest.mark.parametrize("prefix", ["", "tvl/", "runs/2026-01-01/tvl/", "a..b/"])
def test_good_upload_prefixes(prefix):
    assert parse_params({"upload": {"prefix": prefix}}).upload.prefix == prefix


def test_sibling_bounds():
    # quotas that sum to 1 with a negative share
    _fails({"jsonl": {"tactile_quotas": {"tactile_only": 1.2, "dual_image": -0.2, "text_only": 0.0}}},
           "jsonl.tactile_quotas.dual_image")
    _fails({"jsonl": {"prices_per_million": {"gpt-4o-2024-08-06": -1.0}}}, "jsonl.prices_per_million.gpt-4o-2024-08-06")
    _fails({"qa": {"k_by_intent": {"describe": 0}}}, "qa.k_by_intent.describe")
    # a sensor table the size of RAM: bounded like prepare.max_sensor_id
    _fails({"projector": {"num_sensors": 100_000_000}}, "projector.num_sensors")
    _fails({"prepare": {"max_sensor_id": 100_000_000}}, "prepare.max_sensor_id")
    _fails({"prepare": {"default_sensor": 70}}, "prepare", "default_sensor=70", "max_sensor_id=63")
    _fails({"finetune": {"local": {"target_modules": []}}}, "finetune.local.target_modules")


@pytest.mark.parametrize("section", ["embed", "pretrain_smoke", "projector", "index", "evaluate"])
@pytest.mark.parametrize("value", [0, -1, "all", True])
def test_threads_is_auto_or_positive(section, value):
    _fails({section: {"threads": value}}, f"{section}.threads", "threads")


@pytest.mark.parametrize("section", ["embed", "pretrain_smoke", "projector", "index", "evaluate"])
def test_threads_default_auto_and_explicit(section):
    assert getattr(parse_params({}), section).threads == "auto"
    assert getattr(parse_params({section: {"threads": 3}}), section).threads == 3
