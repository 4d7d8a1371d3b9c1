"""The registry: built-ins, and third-party policies from a real (temporary) installed distribution."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from controller.policy_cli import policy as policy_group
from hybridft_common.vocabulary import Mode
from policies.base import PolicyConfigError, PolicyNotFound
from policies.gilbert import Gilbert
from policies.registry import BUILTINS, ENTRY_POINT_GROUP, PolicyLoadError, list_policies, load_policy
from tests.helpers.policy_windows import steady

PLUGIN = '''
"""A third-party policy package, as another project would ship it."""
from dataclasses import dataclass

from hybridft_common.vocabulary import Mode
from policies.base import Decision, Policy, param


@dataclass(frozen=True)
class Params:
    epoch_ms: int = param(120, "epoch", min=10, max=1000)


class AlwaysMC(Policy[Params]):
    name = "acme-always-mc"
    description = "ACME: MC, whatever happens."
    params_type = Params

    def decide(self, window):
        return Decision(Mode.MC, self.params.epoch_ms, "acme says so", None)


class Plain:
    """ACME: a policy that does not subclass Policy."""

    name = "acme-plain"
    description = "ACME: plain COLO."

    def __init__(self, params):
        self.params = dict(params)

    def decide(self, window):
        return Decision(Mode.COLO, window.epoch_ms, "plain", None)

    def reset(self):
        pass


def make_plain(params):
    return Plain(params)


def not_a_policy(params):
    return 42


NOT_CALLABLE = 7
'''


@pytest.fixture
def acme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Install a distribution the way pip would lay it out on sys.path: module + dist-info."""
    (tmp_path / "acme_policies.py").write_text(PLUGIN)
    dist = tmp_path / "acme_policies-1.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-policies\nVersion: 1.2\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(f"""\
        [{ENTRY_POINT_GROUP}]
        acme-always-mc = acme_policies:AlwaysMC
        acme-plain = acme_policies:make_plain
        acme-missing-module = acme_nowhere:Policy
        acme-missing-attr = acme_policies:Nope
        acme-not-a-policy = acme_policies:not_a_policy
        acme-not-callable = acme_policies:NOT_CALLABLE
        gilbert = acme_policies:AlwaysMC
        gilbert-alias = policies.gilbert:Gilbert

        [console_scripts]
        acme = acme_policies:main
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    sys.modules.pop("acme_policies", None)


def test_builtins_listed_and_loadable() -> None:
    infos = {info.name: info for info in list_policies()}
    assert set(BUILTINS) <= set(infos)
    assert {infos[name].origin for name in BUILTINS} == {"builtin"}
    assert all(infos[name].description and infos[name].error is None for name in BUILTINS)
    for name in BUILTINS:
        policy = load_policy(name)
        assert policy.name == name
        assert policy.decide(steady({"cpu.host": 0.2})).mode in Mode


def test_unknown_policy_and_bad_params() -> None:
    with pytest.raises(PolicyNotFound, match="no policy 'remus'; policies: static-mc") as info:
        load_policy("remus")
    assert info.value.code == "policy-not-found"
    with pytest.raises(PolicyConfigError, match="passive_count"):
        load_policy("gilbert", {"passive_count": -1})
    assert isinstance(load_policy("gilbert", {"passive_count": "7"}), Gilbert)


def test_third_party_distribution(acme: Path) -> None:
    infos = {info.name: info for info in list_policies()}  # the broken entries do not break the listing
    good = infos["acme-always-mc"]
    assert good.description == "ACME: MC, whatever happens." and good.error is None
    assert good.origin == "acme-policies 1.2 (acme_policies:AlwaysMC)"
    assert infos["acme-plain"].error is None
    assert infos["acme-plain"].description == "ACME: plain COLO."
    assert "factory returned int" in infos["acme-not-a-policy"].error
    assert "ModuleNotFoundError" in infos["acme-missing-module"].error
    assert "AttributeError" in infos["acme-missing-attr"].error
    assert "neither a Policy subclass nor a factory" in infos["acme-not-callable"].error
    # a third party cannot shadow a built-in; one naming a built-in's class is that built-in
    clash = [i for i in list_policies() if i.name == "gilbert"]
    assert [i.origin for i in clash] == ["builtin", "acme-policies 1.2 (acme_policies:AlwaysMC)"]
    assert clash[1].error == "name taken by the built-in 'gilbert'"
    assert "gilbert-alias" not in infos
    assert isinstance(load_policy("gilbert"), Gilbert)

    loaded = load_policy("acme-always-mc", {"epoch_ms": "300"})
    d = loaded.decide(steady({}))
    assert (d.mode, d.epoch_ms, d.reason) == (Mode.MC, 300, "acme says so")
    with pytest.raises(PolicyConfigError, match="epoch_ms"):
        load_policy("acme-always-mc", {"epoch_ms": 5})
    plain = load_policy("acme-plain", {"k": "v"})
    assert plain.params == {"k": "v"} and plain.decide(steady({})).mode is Mode.COLO
    with pytest.raises(PolicyLoadError, match="does not load: ModuleNotFoundError"):
        load_policy("acme-missing-module")
    with pytest.raises(PolicyLoadError, match="factory returned int"):
        load_policy("acme-not-a-policy")


def test_cli_list_json_includes_third_party(acme: Path) -> None:
    result = CliRunner().invoke(policy_group, ["list", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    names = [item["name"] for item in listed]
    assert names[: len(BUILTINS)] == list(BUILTINS)
    assert "acme-always-mc" in names
    assert all({"name", "description"} <= set(item) for item in listed)
    text = CliRunner().invoke(policy_group, ["list"])
    assert text.exit_code == 0
    assert "acme-missing-module  BROKEN: ModuleNotFoundError" in text.output


def test_pyproject_registers_exactly_the_builtins() -> None:
    import tomllib

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    table = tomllib.loads(pyproject.read_text())["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert table == dict(BUILTINS)
