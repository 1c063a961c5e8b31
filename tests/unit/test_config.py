"""Configuration: the example is valid, and each kind of mistake is reported with its key and reason."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.config import ConfigError, config_from_mapping, example_config_text, load_config, parse_env_value
from tests.helpers import PROJECT_ROOT


def problems_of(raw: dict, environ: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(raw, "test", environ or {})
    return info.value.problems


def test_example_is_valid_and_matches_deploy_copy(tmp_path: Path) -> None:
    text = example_config_text()
    assert (PROJECT_ROOT / "deploy" / "dicom-node.example.toml").read_text() == text
    cfg = load_config(PROJECT_ROOT / "deploy" / "dicom-node.example.toml", environ={})
    assert cfg.node.ae_title == "DENOISE" and cfg.node.port == 11112
    assert cfg.rules[0].name == "ct" and cfg.rules[0].match["Modality"] == "CT"


def test_defaults_without_a_file() -> None:
    cfg = load_config(None, environ={})
    assert cfg.database_url.startswith("sqlite:///") and cfg.database_url.endswith("dicom-node.sqlite3")
    assert cfg.destinations == [] and cfg.rules == []


def test_unknown_key_and_section_are_named() -> None:
    problems = problems_of({"node": {"prot": 11112}, "nodes": {}})
    assert any(p.startswith("node.prot: unknown key") for p in problems)
    assert any(p.startswith("nodes: unknown section") for p in problems)


def test_wrong_types_are_named() -> None:
    problems = problems_of({"node": {"port": "11112", "max_associations": 2.5}, "security": {"tls": "yes"}})
    assert any(p.startswith("node.port: must be integer") for p in problems)
    assert any(p.startswith("node.max_associations: must be integer") for p in problems)
    assert any(p.startswith("security.tls: must be boolean") for p in problems)


def test_every_problem_is_reported_at_once() -> None:
    """Type errors, unknown and missing keys and the checks of the values that are right, all in one pass."""
    problems = problems_of({
        "node": {"port": "11112", "ae_title": "A_TITLE_THAT_IS_TOO_LONG", "prot": 1},
        "security": {"allowed_hosts": ["10.0.0.0/8", 3], "max_pending_per_host": True},
        "web": {"users": [1], "session_hours": 2},
        "rules": [{"match": {"Modality": "CT"}, "model": "m", "strength": "high"}],
    })
    assert "node.port: must be integer, not str ('11112')" in problems
    assert any(p.startswith("node.prot: unknown key (known keys: ae_title, ") for p in problems)
    assert any(p.startswith("node.ae_title:") and "at most 16" in p for p in problems)
    assert "security.allowed_hosts[1]: must be string, not int (3)" in problems
    assert "security.max_pending_per_host: must be integer, not bool (True)" in problems
    assert "web.users[0]: must be a table, not int (1)" in problems
    assert "rules[0].name: required key is missing" in problems
    assert "rules[0].strength: must be number, not str ('high')" in problems
    assert len(problems) == 8  # session_hours = 2: an integer is a number


def test_port_range_and_ae_titles() -> None:
    problems = problems_of({
        "node": {"port": 70000, "ae_title": "A_TITLE_THAT_IS_TOO_LONG"},
        "web": {"port": -1},
        "security": {"allowed_calling_ae_titles": ["GOOD", "BAD\\AE"], "allowed_hosts": ["10.0.0.0/8", "nohost"]},
    })
    assert "node.port: 70000 is out of range 1-65535" in problems
    assert any(p.startswith("node.ae_title:") and "at most 16" in p for p in problems)
    assert any(p.startswith("web.port:") for p in problems)
    assert any(p.startswith("security.allowed_calling_ae_titles[1]:") and "backslash" in p for p in problems)
    assert any(p.startswith("security.allowed_hosts[1]:") for p in problems)
    assert len(problems) == 5


def test_unwritable_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    problems = problems_of({"node": {"data_dir": str(blocker / "sub")}})
    assert any(p.startswith("node.data_dir:") and "not a directory" in p for p in problems)
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        assert any("not writable" in p for p in problems_of({"node": {"data_dir": str(locked / "d")}}))


def test_tls_requires_files() -> None:
    problems = problems_of({"security": {"tls": True, "require_client_certificate": True}})
    assert "security.certificate: required when security.tls is true" in problems
    assert "security.private_key: required when security.tls is true" in problems
    assert any(p.startswith("security.trusted_cas:") for p in problems)


def test_destinations_and_rules_shape() -> None:
    raw = {
        "destinations": [
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242},
            {"name": "pacs", "ae_title": "X", "host": "h", "port": 0},
            {"name": "nohost", "ae_title": "X"},
        ],
        "rules": [
            {"name": "ct", "match": {"Modality": "CT", "SliceThickness": [0.5, 5]}, "model": "m",
             "destinations": ["pacs"]},
            {"name": "bad", "match": {"Modality": 3, "Colour": "red", "SeriesDescription": "(unclosed",
                                      "SliceThickness": [5, 1]},
             "strength": 1.5, "destinations": ["nowhere"]},
        ],
    }
    problems = problems_of(raw)
    assert "destinations[1].name: 'pacs' is used by another destination" in problems
    assert "destinations[1].port: 0 is out of range 1-65535" in problems
    assert "destinations[2].host: required key is missing" in problems
    assert "destinations[2].port: required key is missing" in problems
    assert any(p.startswith("rules[1].match.Modality: must be a string") for p in problems)
    assert any(p.startswith("rules[1].match.Colour: unknown match key") for p in problems)
    assert any(p.startswith("rules[1].match.SeriesDescription:") and "regular expression" in p for p in problems)
    assert any(p.startswith("rules[1].match.SliceThickness:") for p in problems)
    assert "rules[1].strength: 1.5 is outside [0, 1]" in problems
    assert any(p.startswith("rules[1].destinations: 'nowhere'") for p in problems)
    assert not any(p.startswith("rules[0]") for p in problems)


def test_environment_overrides_single_keys(tmp_path: Path) -> None:
    env = {"DICOM_NODE_NODE__PORT": "11113", "DICOM_NODE_NODE__DATA_DIR": str(tmp_path),
           "DICOM_NODE_SECURITY__ALLOWED_CALLING_AE_TITLES": '["CT1", "MR2"]', "UNRELATED": "1"}
    cfg = config_from_mapping({"node": {"port": 1}}, "test", env)
    assert cfg.node.port == 11113 and cfg.node.data_dir == str(tmp_path)
    assert cfg.security.allowed_calling_ae_titles == ["CT1", "MR2"]
    problems = problems_of({}, {"DICOM_NODE_NODE__PORT": "eleven", "DICOM_NODE_NOPE__X": "1"})
    assert any(p.startswith("node.port: must be integer") for p in problems)
    assert any(p.startswith("DICOM_NODE_NOPE__X: unknown section") for p in problems)


def test_parse_env_value() -> None:
    assert parse_env_value("12") == 12 and parse_env_value("true") is True
    assert parse_env_value("/srv/data") == "/srv/data" and parse_env_value("1.5") == 1.5


def test_config_check_command_reports_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nport = 99999\nae_title = "WAY_TOO_LONG_AE_TITLE"\n')
    result = subprocess.run([sys.executable, "-m", "dicom_node", "config", "check", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "node.port: 99999 is out of range" in result.stderr and "node.ae_title" in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[node\n")
    result = subprocess.run([sys.executable, "-m", "dicom_node", "config", "check", str(broken)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "not valid TOML" in result.stderr
    result = subprocess.run([sys.executable, "-m", "dicom_node", "config", "example"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == example_config_text()


# ------------------------------------------------------------------------------------ rules against the models


def model_folder(root: Path, name: str, modalities: list[str], body_parts: list[str],
                 strength_range: list[float] | None = None, weights: bool = True) -> Path:
    """A model folder as far as the configuration check reads it: card.toml (and a weights file)."""
    folder = root / name
    folder.mkdir(parents=True)
    lines = [f'name = "{name}"', 'version = "1"', 'architecture = "unet-res-small"',
             f"modalities = {modalities!r}".replace("'", '"'), f"body_parts = {body_parts!r}".replace("'", '"')]
    if strength_range is not None:
        lines.append(f"strength_range = {strength_range!r}")
    (folder / "card.toml").write_text("\n".join(lines) + "\n")
    if weights:
        (folder / "weights.safetensors").write_bytes(b"not read by the check")
    return folder


def model_problems_of(rules: list[dict], models: Path, tmp_path: Path) -> list[str]:
    raw = {"node": {"data_dir": str(tmp_path / "var")}, "models": {"directories": [str(models)]}, "rules": rules}
    config_from_mapping(raw, "test", {})  # structurally valid: every problem below comes from the model check
    with pytest.raises(ConfigError) as info:
        config_from_mapping(raw, "test", {}, check_models=True)
    return info.value.problems


def test_rule_naming_an_unknown_model_is_refused_with_the_closest_name(tmp_path: Path) -> None:
    problems = model_problems_of([{"name": "ok", "match": {"Modality": "CT", "BodyPartExamined": "(?i)head"},
                                   "model": "ct-cnn-small", "strength": 0.5},
                                  {"name": "typo", "match": {"Modality": "CT", "BodyPartExamined": "HEAD"},
                                   "model": "ct-cnn-smal"}], tmp_path / "none", tmp_path)
    assert problems == ["rules[1].model: unknown model 'ct-cnn-smal' (known: ct-cnn, ct-cnn-small, endo-cnn, mr-cnn, "
                        "us-cnn, xr-cnn; did you mean 'ct-cnn-small'?)"]


def test_rule_must_fit_the_model_card(tmp_path: Path) -> None:
    models = tmp_path / "models"
    model_folder(models, "head", ["CT"], ["HEAD"], strength_range=[0.0, 0.6])
    model_folder(models, "noweights", ["CT"], [], weights=False)
    problems = model_problems_of([
        {"name": "all-ct", "match": {"Modality": "CT"}, "model": "head", "strength": 0.5},
        {"name": "mr", "match": {"Modality": ["CT", "MR"], "BodyPartExamined": "HEAD"}, "model": "head",
         "strength": 0.5},
        {"name": "any", "model": "head", "match": {"BodyPartExamined": "(?i)head"}, "strength": 0.5},
        {"name": "wide", "match": {"Modality": "CT", "BodyPartExamined": ".*"}, "model": "head", "strength": 0.5},
        {"name": "chest", "match": {"Modality": "CT", "BodyPartExamined": "CHEST"}, "model": "head",
         "strength": 0.5},
        {"name": "strong", "match": {"Modality": "CT", "BodyPartExamined": "(?i)^(head|brain)$"}, "model": "head",
         "strength": 0.8},
        {"name": "good", "match": {"Modality": "CT", "BodyPartExamined": "(?i)^(head|brain)$"}, "model": "head",
         "strength": 0.6},
        {"name": "w", "match": {"Modality": "CT"}, "model": "noweights"},
    ], models, tmp_path)
    assert problems[0].startswith("rules[0].match.BodyPartExamined: missing, so every body part goes to model "
                                  "'head', whose card lists HEAD only")
    assert problems[1] == "rules[1].match.Modality: model 'head' is made for CT series, not 'MR'"
    assert problems[2].startswith("rules[2].match.Modality: missing") and 'add Modality = "CT"' in problems[2]
    assert problems[3].startswith("rules[3].match.BodyPartExamined: '.*' also matches CHEST")
    assert problems[4].startswith("rules[4].match.BodyPartExamined: 'CHEST' matches none of the body parts")
    assert problems[5] == ("rules[5].strength: 0.8 is outside [0, 0.6], the range the card of model 'head' "
                           "allows")
    assert problems[6].startswith("rules[7].model: model 'noweights' has no weights.safetensors")
    assert len(problems) == 7  # rules[6] fits


def test_dashboard_on_the_dicom_port_is_refused(tmp_path: Path) -> None:
    problems = problems_of({"node": {"port": 8080, "data_dir": str(tmp_path)}})
    assert problems == ["web.port: 8080 is node.port too, on overlapping addresses (web.bind_address '127.0.0.1', "
                        "node.bind_address '0.0.0.0'); give the dashboard another port, or 0 to turn it off"]
    # Different addresses, or the dashboard off: no clash.
    config_from_mapping({"node": {"port": 8080, "bind_address": "10.0.0.1", "data_dir": str(tmp_path)}}, "t", {})
    config_from_mapping({"node": {"port": 8080, "data_dir": str(tmp_path)}, "web": {"port": 0}}, "t", {})


def test_config_check_and_serve_refuse_a_misspelled_model(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\nport = {11000 + os.getpid() % 1000}\n'
                      "[web]\nport = 0\n[[rules]]\nname = \"ct\"\n"
                      'match = { Modality = "CT", BodyPartExamined = "(?i)^(head|brain)$" }\n'
                      'model = "ct-cnn-smal"\nstrength = 0.5\n')
    expected = "rules[0].model: unknown model 'ct-cnn-smal'"
    for command in (["config", "check", str(config)], ["serve", "--config", str(config)]):
        result = subprocess.run([sys.executable, "-m", "dicom_node", *command], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and "did you mean 'ct-cnn-small'?" in result.stderr
    assert not (tmp_path / "var").exists()  # serve stopped before touching storage


def test_the_example_rule_fits_its_model_and_the_old_one_did_not(tmp_path: Path) -> None:
    load_config(PROJECT_ROOT / "deploy" / "dicom-node.example.toml", environ={}, check_models=True)
    # The rule as it was: every CT body part to a model whose card says HEAD.
    old_rule = {"name": "ct", "match": {"Modality": "CT"}, "model": "ct-cnn-small", "strength": 0.5}
    problems = model_problems_of([old_rule], tmp_path / "none", tmp_path)
    assert len(problems) == 1 and problems[0].startswith("rules[0].match.BodyPartExamined: missing")


def test_job_retry_policy_is_checked() -> None:
    problems = problems_of({"worker": {"backoff_base_seconds": 0.0}, "export": {"backoff_base_seconds": 700.0}})
    assert "worker.backoff_base_seconds: must be positive" in problems
    assert "export.backoff_max_seconds: must be at least export.backoff_base_seconds" in problems
