"""What a policy is: ``decide(window) -> Decision``, typed parameters, and the errors around them.

Purity is the contract (ARCHITECTURE.md section 6): a policy does no I/O and reads no clock; its only
inputs are the windows it is shown, in order.  State is allowed -- Gilbert's mean of checkpoint
lengths, the cost model's memory of the last divergence rate -- but only fed from windows and
cleared by :meth:`Policy.reset`, so a recorded trace replays to the same decisions
(:func:`policies.trace.replay`).

Parameters are a frozen dataclass per policy, built from a mapping by :func:`parse_params`: each
field carries its help and allowed range (:func:`param`), strings from a command line
(``--param k=v``) are converted, and an unknown key or a bad value raises
:class:`PolicyConfigError` naming the key and what is allowed -- a typo never runs silently with a
default.

A :class:`Decision` names the signal that drove it, both in ``reason`` (for people, with the value and
the threshold or costs it was compared with) and in ``signal`` (for tools: the mode timeline plots
it).  It validates itself, so a policy that builds a nonsense decision fails at once, in its own
``decide``, where the guard (:mod:`policies.guard`) counts it as a failure.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

from hybridft_common.errors import HybridftError
from hybridft_common.vocabulary import EPOCH_MS_MAX, EPOCH_MS_MIN, MODE_CHOICES, Mode
from policies.window import ProtectionPoint, Window

__all__ = [
    "Decision",
    "Failure",
    "NoParams",
    "ParamInfo",
    "Policy",
    "PolicyConfigError",
    "PolicyError",
    "PolicyLike",
    "PolicyNotFound",
    "decision_problems",
    "describe_outcome",
    "param",
    "param_infos",
    "params_to_json",
    "parse_params",
]


class PolicyError(HybridftError):
    """A policy could not be found, configured or loaded."""

    def __init__(self, message: str, code: str = "policy-error") -> None:
        super().__init__(message, code)


class PolicyConfigError(PolicyError):
    """A parameter is unknown or out of range; ``key`` names it, ``allowed`` says what would do."""

    def __init__(self, message: str, key: str | None = None, allowed: str | None = None) -> None:
        super().__init__(message, "policy-config")
        self.key = key
        self.allowed = allowed


class PolicyNotFound(PolicyError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = "policy-not-found"


# -- decisions ----------------------------------------------------------------------------------------


def decision_problems(value: object) -> list[str]:
    """Why ``value`` is not a usable decision (empty list: it is one).  The guard asks the same."""
    if not isinstance(value, Decision):
        return [f"not a Decision: {type(value).__name__} {value!r:.80}"]
    problems = []
    if not isinstance(value.mode, Mode):
        problems.append(f"mode {value.mode!r} is not one of {[str(m) for m in Mode]}")
    epoch = value.epoch_ms
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        problems.append(f"epoch_ms {epoch!r} is not an integer")
    elif not EPOCH_MS_MIN <= epoch <= EPOCH_MS_MAX:
        problems.append(f"epoch_ms {epoch} outside {EPOCH_MS_MIN}..{EPOCH_MS_MAX}")
    if not isinstance(value.passive_secondary, bool):
        problems.append(f"passive_secondary {value.passive_secondary!r} is not a bool")
    if not isinstance(value.reason, str) or not value.reason:
        problems.append("reason must be a non-empty string")
    if value.signal is not None and not isinstance(value.signal, str):
        problems.append(f"signal {value.signal!r} is neither a string nor None")
    return problems


@dataclass(frozen=True, slots=True)
class Decision:
    """The point a policy asks for, and why.

    ``reason`` is for people and names the driving signal with its value and what it was compared
    with (``"div.per_s=12.0 > 2.0 (cost colo 0.41 > mc 0.12)"``); ``signal`` is that signal's name
    (None when nothing measured drove it, e.g. a static policy).  ``passive_secondary`` only matters
    in MC.  A plain string mode (``"mc"``) is accepted and stored as :class:`Mode`.
    """

    mode: Mode
    epoch_ms: int
    reason: str
    signal: str | None = None
    passive_secondary: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.mode, str) and not isinstance(self.mode, Mode) and self.mode in MODE_CHOICES:
            object.__setattr__(self, "mode", Mode(self.mode))
        problems = decision_problems(self)
        if problems:
            raise ValueError("bad decision: " + "; ".join(problems))

    @property
    def point(self) -> ProtectionPoint:
        return ProtectionPoint(self.mode, self.epoch_ms, self.passive_secondary)

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": str(self.mode),
            "epoch_ms": self.epoch_ms,
            "passive_secondary": self.passive_secondary,
            "reason": self.reason,
            "signal": self.signal,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Decision:
        try:
            return cls(
                Mode(data["mode"]),
                data["epoch_ms"],
                data["reason"],
                data.get("signal"),
                data.get("passive_secondary", False),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a decision: {data!r}") from exc


@dataclass(frozen=True, slots=True)
class Failure:
    """A ``decide`` that raised or returned nonsense, described as :func:`describe_outcome` does."""

    error: str


def describe_outcome(outcome: object) -> Decision | Failure:
    """A decision if ``outcome`` is a usable one, else the failure as one stable line of text.

    The daemon records this in its trace and a replay computes it again, so the text depends only on
    the outcome: ``"raised ValueError: ..."`` or ``"nonsense: ..."``.  A :class:`Failure` (a recorded
    one, replayed) is returned as it is.
    """
    if isinstance(outcome, Failure):
        return outcome
    if isinstance(outcome, BaseException):
        return Failure(f"raised {type(outcome).__name__}: {outcome}")
    problems = decision_problems(outcome)
    if problems:
        return Failure("nonsense: " + "; ".join(problems))
    assert isinstance(outcome, Decision)
    return outcome


# -- parameters ---------------------------------------------------------------------------------------


def param(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A parameter field: its default, one line of help, and the inclusive range or the choices."""
    return dataclasses.field(
        default=default, metadata={"help": help, "min": min, "max": max, "choices": choices}
    )


@dataclass(frozen=True, slots=True)
class ParamInfo:
    """One parameter as ``list``/``show`` print it."""

    name: str
    kind: str
    default: Any
    help: str
    allowed: str


@dataclass(frozen=True)
class NoParams:
    """A policy without parameters."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _allowed(kind: type, meta: Mapping[str, Any]) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(meta["choices"])
    if kind is bool:
        return "true or false"
    low, high = meta.get("min"), meta.get("max")
    name = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
    if low is not None and high is not None:
        return f"{name} in {low}..{high}"
    if low is not None:
        return f"{name} >= {low}"
    if high is not None:
        return f"{name} <= {high}"
    return name


def _field_kinds(params_type: type) -> dict[str, type]:
    hints = typing.get_type_hints(params_type)
    return {f.name: hints[f.name] for f in dataclasses.fields(params_type)}


def _convert(key: str, kind: type, value: object, meta: Mapping[str, Any]) -> Any:
    allowed = _allowed(kind, meta)

    def bad() -> PolicyConfigError:
        return PolicyConfigError(f"parameter {key!r} must be {allowed}, got {value!r}", key, allowed)

    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad()
    if kind is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise bad() from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise bad()
    elif kind is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise bad() from None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad()
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise bad()
        if meta.get("choices") and value not in meta["choices"]:
            raise bad()
    else:  # pragma: no cover - a policy author's mistake, caught by the built-ins' tests
        raise TypeError(f"parameter {key!r} has unsupported type {kind!r}")
    low, high = meta.get("min"), meta.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        raise bad()
    return value


P = TypeVar("P")


def parse_params(params_type: type[P], values: Mapping[str, object] | None, policy: str = "") -> P:
    """``params_type`` built from ``values`` (missing keys take their defaults).

    Unknown keys and bad values raise :class:`PolicyConfigError`; so does the dataclass's own
    ``__post_init__`` check of how the values relate (a low threshold above its high one).
    """
    values = dict(values or {})
    kinds = _field_kinds(params_type)
    owner = f" of policy {policy!r}" if policy else ""
    for key in values:
        if key not in kinds:
            allowed = ", ".join(sorted(kinds)) or "none"
            raise PolicyConfigError(f"unknown parameter {key!r}{owner}; parameters: {allowed}", key, allowed)
    converted = {}
    for f in dataclasses.fields(params_type):  # type: ignore[arg-type]
        if f.name in values:
            converted[f.name] = _convert(f.name, kinds[f.name], values[f.name], f.metadata)
    try:
        return params_type(**converted)
    except PolicyConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise PolicyConfigError(f"bad parameters{owner}: {exc}") from exc


def param_infos(params_type: type) -> list[ParamInfo]:
    kinds = _field_kinds(params_type)
    return [
        ParamInfo(
            f.name,
            kinds[f.name].__name__,
            f.default,
            f.metadata.get("help", ""),
            _allowed(kinds[f.name], f.metadata),
        )
        for f in dataclasses.fields(params_type)
    ]


def params_to_json(params: object) -> dict[str, Any]:
    """A policy's parameters as a JSON object (the trace and ``show`` print them)."""
    if not dataclasses.is_dataclass(params) or isinstance(params, type):
        return {}
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}


# -- policies -----------------------------------------------------------------------------------------


@runtime_checkable
class PolicyLike(Protocol):
    """What the daemon needs from a policy (third-party ones need not subclass :class:`Policy`)."""

    name: str
    description: str
    params: Any

    def decide(self, window: Window) -> Decision: ...

    def reset(self) -> None: ...


class Policy(ABC, Generic[P]):
    """Base class of the built-in policies (and the easy way to write a third-party one).

    Subclasses set ``name``, ``description`` and ``params_type`` (a frozen dataclass whose fields are
    made with :func:`param`) and implement :meth:`decide`; stateful ones override :meth:`reset`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params_type: ClassVar[type] = NoParams
    # Whether the policy reads the MC shadow comparison (div.*): while it decides, the daemon stretches
    # one short MC epoch a second so that the shadow sees the secondary's answers (controller.epoch,
    # CheckpointScheduler); a policy that never reads them spares the guest that cost.
    reads_shadow: ClassVar[bool] = True

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        self.params: P = parse_params(type(self).params_type, params, type(self).name)
        self.reset()

    @abstractmethod
    def decide(self, window: Window) -> Decision:
        """The point to run next, from ``window`` (and state fed by earlier windows) only."""

    def reset(self) -> None:
        """Forget everything learnt from earlier windows (a replay starts here)."""

    def params_json(self) -> dict[str, Any]:
        return params_to_json(self.params)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params_json()})"
