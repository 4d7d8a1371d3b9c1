"""``hybridft policy list|replay`` through the real console entry point."""

from __future__ import annotations

import json
import subprocess

from hybridft_common.cli import hybridft_command


def test_policy_list_json_names_every_builtin() -> None:
    out = subprocess.run([*hybridft_command("policy", "list", "--json")], capture_output=True, text=True,
                         timeout=60, check=True).stdout  # fmt: skip
    listed = json.loads(out)
    assert isinstance(listed, list)
    names = {entry["name"] for entry in listed}
    assert {"static-mc", "static-colo", "gilbert", "threshold", "cost-model"} <= names
    assert all(isinstance(entry["description"], str) and entry["description"] for entry in listed)


def test_policy_group_help_lists_its_commands() -> None:
    out = subprocess.run([*hybridft_command("policy", "--help")], capture_output=True, text=True, timeout=60,
                         check=True).stdout  # fmt: skip
    assert "list" in out and "replay" in out
