"""Typed config: presets, dotted overrides, and one clear ConfigError naming the key."""

from __future__ import annotations

import os

import pytest

from histodiff.config import ConfigError, HistodiffConfig, config_from_dict, load_config, parse_overrides


def test_presets_load_and_derive_paths():
    tiny = load_config("tiny")
    assert tiny.data.tile_size == 32
    assert tiny.paths.unlabeled_sources == [os.path.abspath("outputs/builtin/unlabeled")]
    assert tiny.paths.labeled_shards == os.path.abspath("outputs/tiny/shards/labeled")
    paper = load_config("paper")
    assert paper.data.tile_size == 256


def test_overrides_parse_yaml_values_and_win_over_the_preset():
    cfg = load_config("tiny", ["data.tile_size=48", "paths.unlabeled_sources=[a, s3://b/c]", "data.augment=false"])
    assert cfg.data.tile_size == 48
    assert cfg.paths.unlabeled_sources == [os.path.abspath("a"), "s3://b/c"]  # absolute: Ray workers run elsewhere
    assert cfg.data.augment is False
    assert parse_overrides(["a.b.c=1", "a.b.d=x"]) == {"a": {"b": {"c": 1, "d": "x"}}}


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ("data.tile_sise=32", "data.tile_sise", "unknown key"),
        ("dataa.tile_size=32", "dataa", "unknown key"),
        ("data.tile_size=abc", "data.tile_size", "integer"),
        ("data.max_bad_fraction=1.5", "data.max_bad_fraction", "less than or equal to 1"),
        ("storage.connect_timeout_s=0", "storage.connect_timeout_s", "greater than 0"),
    ],
)
def test_bad_override_is_one_error_naming_the_key(override, key, words):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [override])
    msg = str(info.value)
    assert f"{key}:" in msg and words in msg
    assert msg.count("\n  ") == 1  # exactly one problem reported


def test_typo_in_a_yaml_file_names_the_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("paths:\n  root: out\ndata:\n  tile_size: 32\n  saturaton_threshold: 80\n")
    with pytest.raises(ConfigError, match=r"data\.saturaton_threshold: unknown key"):
        load_config(str(path))


def test_cross_field_rules_and_malformed_input():
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config("tiny", ["data.val_fraction=0.6", "data.test_fraction=0.5"])
    with pytest.raises(ConfigError, match="label_fraction"):
        load_config("tiny", ["data.label_fraction=0.05"])  # tiny already sets labels_per_class
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config("tiny", ["data.tile_size"])
    with pytest.raises(ConfigError, match="unknown preset 'tinny'"):
        load_config("tinny")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nowhere.yaml")


def test_secrets_never_reach_errors_params_or_public_dict():
    secret = "s3cr3t-VALUE-never-shown"
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [f"storage.secret_access_key={secret}", "storage.access_key_id=AKIAEXAMPLE",
                             "storage.max_attempts=0"])
    assert secret not in str(info.value) and "storage.max_attempts" in str(info.value)
    cfg = load_config("tiny", [f"storage.secret_access_key={secret}", "storage.access_key_id=AKIAEXAMPLE"])
    assert cfg.storage.secret_access_key.get_secret_value() == secret
    assert secret not in repr(cfg) and secret not in str(cfg.public_dict())
    assert all(secret not in v for v in cfg.flat_params().values())
    assert "storage.secret_access_key" not in cfg.flat_params()


def test_config_round_trips_through_public_dict_and_fingerprints():
    cfg = load_config("tiny")
    again = config_from_dict(cfg.public_dict())
    assert again == cfg
    assert cfg.fingerprint("data") == again.fingerprint("data")
    other = load_config("tiny", ["data.tile_size=48"])
    assert other.fingerprint("data") != cfg.fingerprint("data")
    assert other.fingerprint("denoiser") == cfg.fingerprint("denoiser")
    assert HistodiffConfig().data.tile_size == 64  # the code default when no preset is given


def test_a_discriminator_too_deep_for_the_tiles_is_a_config_error():
    load_config("tiny", ["autoencoder.disc_weight=0.5"])  # 32 px tiles fit the default 3 layers
    with pytest.raises(ConfigError, match=r"disc_layers=3 needs data.tile_size >= 24.*got 16"):
        load_config("tiny", ["autoencoder.disc_weight=0.5", "data.tile_size=16"])
