"""Reloading a running configuration in place, and the dashboard editor's rewrite of rules and destinations."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from dicom_node.config import config_from_mapping
from dicom_node.ops.reload import EditRefused, apply_config, edited_file_text, rules_and_destinations_toml

FILE = """# Site configuration
[node]
quiet_seconds = 5.0   # seconds

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "10.0.0.1"
port = 104

[[rules]]
name = "ct"
match = { Modality = "CT", SeriesDescription = "(?i)head\\\\s" }
forward_original = true
destinations = ["pacs"]

# The dashboard
[web]
session_hours = 8.0

[[rules]]
name = "mr"
forward_original = true
[rules.match]
Modality = "MR"
"""


def test_editor_replaces_rules_and_destinations_and_keeps_everything_else() -> None:
    raw = tomllib.loads(FILE)
    shown = rules_and_destinations_toml(raw)
    assert tomllib.loads(shown) == {"destinations": raw["destinations"], "rules": raw["rules"]}
    edited = shown.replace('name = "mr"', 'name = "mr-brain"')
    new_text, new_raw = edited_file_text(FILE, edited)
    assert new_raw["rules"][1]["name"] == "mr-brain"
    assert new_raw["rules"][0]["match"]["SeriesDescription"] == r"(?i)head\s"
    assert new_raw["node"] == {"quiet_seconds": 5.0} and new_raw["web"] == {"session_hours": 8.0}
    assert "# Site configuration" in new_text and "# The dashboard\n[web]" in new_text
    assert "quiet_seconds = 5.0   # seconds" in new_text
    # Removing every rule and destination leaves the rest.
    _text, emptied = edited_file_text(FILE, "")
    assert "rules" not in emptied and "destinations" not in emptied and emptied["web"] == {"session_hours": 8.0}


@pytest.mark.parametrize("edited, why", [
    ("[node]\nport = 1\n", "only [[rules]] and [[destinations]]"),
    ("[[rules]\nname = ", "not valid TOML"),
])
def test_editor_refuses_other_sections_and_broken_toml(edited: str, why: str) -> None:
    with pytest.raises(EditRefused) as caught:
        edited_file_text(FILE, edited)
    assert why in str(caught.value)


def test_editor_refuses_a_file_it_cannot_rewrite() -> None:
    inline = 'rules = [{ name = "x", forward_original = true }]\n[node]\nport = 11112\n'
    with pytest.raises(EditRefused) as caught:
        edited_file_text(inline, '[[rules]]\nname = "y"\nforward_original = true\n')
    assert "cannot rewrite" in str(caught.value)


def test_apply_config_changes_live_keys_in_place_and_reports_restart_keys(tmp_path: Path) -> None:
    base: dict[str, Any] = {"node": {"data_dir": str(tmp_path), "quiet_seconds": 5.0, "port": 11112},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104}],
            "rules": [{"name": "ct", "match": {"Modality": "CT"}, "forward_original": True,
                       "destinations": ["pacs"]}]}
    running = config_from_mapping(base, "a.toml", environ={})
    rules_before = running.rules
    changed = {**base, "node": {**base["node"], "quiet_seconds": 2.0, "port": 11113},
               "destinations": base["destinations"] + [{"name": "pacs2", "ae_title": "P2", "host": "h", "port": 105}],
               "rules": [{**base["rules"][0], "destinations": ["pacs", "pacs2"]}]}
    new = config_from_mapping(changed, "a.toml", environ={})
    result = apply_config(running, new)
    assert result.changed == ["destinations", "node", "rules"]
    assert sorted(result.applied) == ["destinations", "node.quiet_seconds", "rules"]
    assert result.needs_restart == ["node.port"]
    assert running.node.quiet_seconds == 2.0 and running.node.port == 11112
    assert [d.name for d in running.destinations] == ["pacs", "pacs2"]
    assert running.rules is not rules_before and running.rules[0].destinations == ["pacs", "pacs2"]
    assert apply_config(running, new).applied == []  # nothing left to apply; the port still needs a restart
