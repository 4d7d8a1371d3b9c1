"""Finding policies: the built-ins, plus third-party ones from the ``hybridft.policies`` entry points.

A third-party distribution registers a policy as

.. code-block:: toml

    [project.entry-points."hybridft.policies"]
    my-policy = "my_package.policy:MyPolicy"

where the target is a :class:`~policies.base.Policy` subclass (constructed with the parameter
mapping) or any callable that takes the mapping and returns an object with ``name``,
``description``, ``params``, ``decide(window)`` and ``reset()`` (:class:`~policies.base.PolicyLike`).

The built-ins are importable without any installed metadata (a source tree works), and hybridft's
own pyproject registers them in the same group, so ``importlib.metadata`` shows them to other tools;
an entry point that points at a built-in is the built-in, not a duplicate.  A third-party name equal
to a built-in's is refused (listed with an error), so nobody can shadow ``gilbert``.

Listing never fails: an entry point whose module does not import, or whose target is not a policy,
is listed with ``error`` set and cannot be loaded; the others are unaffected.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from policies.base import Policy, PolicyConfigError, PolicyError, PolicyLike, PolicyNotFound

__all__ = ["BUILTINS", "ENTRY_POINT_GROUP", "PolicyInfo", "PolicyLoadError", "list_policies", "load_policy"]

ENTRY_POINT_GROUP = "hybridft.policies"

#: name -> "module:class" of the built-in policies (pyproject's entry-point table says the same)
BUILTINS: Mapping[str, str] = {
    "static-mc": "policies.static:StaticMC",
    "static-colo": "policies.static:StaticColo",
    "gilbert": "policies.gilbert:Gilbert",
    "threshold": "policies.threshold:Threshold",
    "cost-model": "policies.cost_model:CostModel",
    "learned": "policies.learned:Learned",
}

BUILTIN_ORIGIN = "builtin"


class PolicyLoadError(PolicyError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = "policy-load"


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """One policy as listed: ``origin`` is ``builtin`` or ``DIST VERSION (module:attr)``."""

    name: str
    description: str
    origin: str
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "origin": self.origin,
            "error": self.error,
        }


def _import(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def _third_party() -> list[importlib.metadata.EntryPoint]:
    points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    builtin_targets = set(BUILTINS.values())
    # an entry point naming a built-in's own class is that built-in (hybridft's pyproject registers them)
    return sorted(
        (ep for ep in points if ep.value.replace(" ", "") not in builtin_targets),
        key=lambda ep: (ep.name, ep.value),
    )


def _origin(ep: importlib.metadata.EntryPoint) -> str:
    dist = ep.dist
    owner = f"{dist.metadata['Name']} {dist.version}" if dist is not None else "unknown distribution"
    return f"{owner} ({ep.value})"


def _describe(target: Any) -> str:
    """The description of a loaded entry-point target, or PolicyLoadError if it is no policy."""
    if isinstance(target, type) and issubclass(target, Policy):
        if not target.name:
            raise PolicyLoadError(f"{target.__qualname__} has no name")
        return target.description
    if callable(target):
        try:  # policies are pure, so building one to read its description has no side effect
            description = _construct("(listing)", target, {}).description
        except PolicyConfigError:  # it needs parameters: its documentation has to do
            doc = (getattr(target, "__doc__", None) or "").strip()
            return doc.splitlines()[0] if doc else ""
        return description if isinstance(description, str) else ""
    raise PolicyLoadError(f"{target!r} is neither a Policy subclass nor a factory")


def list_policies() -> list[PolicyInfo]:
    """Every policy: built-ins first, then the entry points' sorted by name; broken ones carry an error."""
    infos = [
        PolicyInfo(name, _import(target).description, BUILTIN_ORIGIN) for name, target in BUILTINS.items()
    ]
    for ep in _third_party():
        origin = _origin(ep)
        if ep.name in BUILTINS:
            infos.append(PolicyInfo(ep.name, "", origin, f"name taken by the built-in {ep.name!r}"))
            continue
        try:
            description = _describe(ep.load())
        except Exception as exc:  # a broken plug-in is reported, never fatal to the listing
            infos.append(PolicyInfo(ep.name, "", origin, f"{type(exc).__name__}: {exc}"))
        else:
            infos.append(PolicyInfo(ep.name, description, origin))
    return infos


def _construct(name: str, target: Any, params: Mapping[str, object] | None) -> PolicyLike:
    if isinstance(target, type) and issubclass(target, Policy):
        return target(params)
    if not callable(target):
        raise PolicyLoadError(f"policy {name!r}: {target!r} is neither a Policy subclass nor a factory")
    policy = target(dict(params or {}))
    if not isinstance(policy, PolicyLike):
        raise PolicyLoadError(
            f"policy {name!r}: the factory returned {type(policy).__name__}, which lacks name, description, "
            "params, decide or reset"
        )
    return policy


def load_policy(name: str, params: Mapping[str, object] | None = None) -> PolicyLike:
    """A new instance of policy ``name`` with ``params`` (PolicyConfigError if they are wrong)."""
    if name in BUILTINS:
        return _construct(name, _import(BUILTINS[name]), params)
    matches = [ep for ep in _third_party() if ep.name == name]
    if not matches:
        known = ", ".join(info.name for info in list_policies() if info.error is None)
        raise PolicyNotFound(f"no policy {name!r}; policies: {known}")
    if len(matches) > 1:
        raise PolicyLoadError(
            f"policy {name!r} is registered by {len(matches)} entry points: "
            + ", ".join(_origin(ep) for ep in matches)
        )
    try:
        target = matches[0].load()
    except Exception as exc:
        raise PolicyLoadError(
            f"policy {name!r} ({_origin(matches[0])}) does not load: {type(exc).__name__}: {exc}"
        ) from exc
    return _construct(name, target, params)
