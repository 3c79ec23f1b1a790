"""The configuration model: strict loading and the generated reference."""
from __future__ import annotations

from pathlib import Path

import pytest

from pysnap.config import Config, ConfigError, reference_markdown

REPO = Path(__file__).resolve().parents[2]


def test_an_empty_file_gives_the_defaults():
    assert Config.from_toml("") == Config()


def test_a_missing_default_config_file_gives_the_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr("pysnap.config.DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert Config.load(tmp_path / "absent.toml") == Config()


def test_a_missing_explicit_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        Config.load(tmp_path / "absent.toml")


def test_an_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown key 'nri.max_volume'"):
        Config.from_toml("[nri]\nmax_volume = 3\n")


def test_an_unknown_section_is_named():
    with pytest.raises(ConfigError, match="unknown key 'snapshoter'"):
        Config.from_toml("[snapshoter]\n")


def test_a_value_of_the_wrong_type_is_named():
    with pytest.raises(ConfigError, match="snapshotter.workers: expected a positive integer"):
        Config.from_toml("[snapshotter]\nworkers = \"many\"\n")


def test_a_relative_path_is_refused():
    with pytest.raises(ConfigError, match="content.root: expected an absolute path"):
        Config.from_toml("[content]\nroot = \"var/lib\"\n")


def test_a_metrics_address_off_loopback_is_refused():
    with pytest.raises(ConfigError, match="only loopback"):
        Config.from_toml("[snapshotter]\nmetrics_address = \"0.0.0.0:9100\"\n")


def test_a_loopback_metrics_address_is_accepted():
    config = Config.from_toml("[content]\nmetrics_address = \"127.0.0.1:9100\"\n")
    assert config.content.metrics_address == "127.0.0.1:9100"


def test_an_nri_plugin_index_must_be_two_digits():
    with pytest.raises(ConfigError, match="nri.plugin_index: expected two digits"):
        Config.from_toml("[nri]\nplugin_index = \"5\"\n")


def test_forbidden_targets_must_be_absolute():
    with pytest.raises(ConfigError, match="nri.forbidden_targets"):
        Config.from_toml("[nri]\nforbidden_targets = [\"proc\"]\n")


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[nri\n")
    with pytest.raises(ConfigError, match=str(path)):
        Config.load(path)


def test_docs_configuration_md_is_generated_from_the_model():
    assert (REPO / "docs" / "configuration.md").read_text() == reference_markdown(), (
        "docs/configuration.md is stale: run `pysnap config reference > docs/configuration.md`")


def test_the_reference_documents_every_key():
    text = reference_markdown()
    for section in ("snapshotter", "content", "nri"):
        for key in getattr(Config(), section).__dataclass_fields__:
            assert f"| `{key}` |" in text
