"""The learned policy: a classifier, trained on measured runs, that names the better protection point.

Why a learned policy next to the cost model: the cost model is first order and its constants come from
a few measurements; where the real trade-off bends (a CPU-starved secondary, a working set that
saturates, a comparator that holds longer under load) it can be wrong in a way no constant fixes.  The
experiment runner measures, per workload phase, which static point (MC at each epoch, or COLO) served
the guest and its clients best -- the oracle -- and records the windows the daemon saw meanwhile.  A
classifier fitted to (window features -> best point) learns that boundary from measurements instead
of a model.

Features (:data:`FEATURES`) describe the *workload*, not the mode it happens to run in, so a model
trained on windows from MC runs can be asked about COLO and the other way round: divergences are
shadow-compared in MC (``div.per_s`` exists in both modes), dirtying, turns, network bytes, disk
operations and host CPU do not depend on the mode to first order.  Checkpoint rates and pauses do, so
they are left out.  Each feature is the mean over the last ``average_s`` seconds, ``log1p``-scaled
(rates span six orders of magnitude); an absent signal is 0 plus, for ``div.per_s``, a presence flag
(a passive MC secondary shadow-compares nothing: "no divergences" and "not measured" must differ).

The model is a scikit-learn pipeline (standard scaling + multinomial logistic regression): small,
fast (a decision takes about 0.1 ms, far below the guard's time limit) and explainable -- each
feature's contribution to the chosen class is ``coef * scaled value``, so the decision's ``signal``
is the feature that pushed hardest, as every policy's reason must name one.  It is stored with skops,
whose loader refuses any type not on :data:`TRUSTED_TYPES` (no pickle code runs from a model file).

Labels are point names: ``"colo"`` or ``"mc-<epoch_ms>"``.  Below ``min_confidence`` the policy keeps
the current point (the model does not know; hysteresis belongs to the guard, but an unsure model must
not ask for a switch).  The policy is pure: the model is loaded once, at construction, and ``decide``
reads only the window.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hybridft_common.vocabulary import EPOCH_MS_MAX, EPOCH_MS_MIN, Mode
from policies.base import Decision, Policy, PolicyConfigError, PolicyError, param
from policies.window import Window

__all__ = [
    "DEFAULT_MODEL",
    "FEATURES",
    "MODEL_FORMAT",
    "TRUSTED_TYPES",
    "Learned",
    "LearnedModel",
    "LearnedParams",
    "ModelError",
    "features",
    "fit_model",
    "label_point",
    "load_model",
    "parse_label",
    "save_model",
]

#: The signals a model sees, in this order.  Changing it is a new MODEL_FORMAT.
FEATURES: tuple[str, ...] = (
    "div.per_s",
    "net.turns_per_s",
    "mem.dirty_bytes_per_s",
    "net.bytes_per_s.from_guest",
    "net.bytes_per_s.to_guest",
    "disk.write_ops_per_s",
    "disk.flushes_per_s",
    "cpu.host",
)
#: The extra column: 1 when ``div.per_s`` was measured in the window (an active secondary), else 0.
PRESENCE = "div.measured"
MODEL_FORMAT = 1

#: Every type a model file may hold; skops refuses to load anything else.
TRUSTED_TYPES: tuple[str, ...] = (
    "sklearn.pipeline.Pipeline",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.linear_model._logistic.LogisticRegression",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.float64",
    "numpy.int64",
    "numpy.str_",
    "builtins.str",
    "builtins.int",
    "builtins.float",
    "builtins.list",
    "builtins.dict",
    "builtins.tuple",
)

_LABEL = re.compile(r"(colo|mc-(\d+))\Z")
#: the file a ``learned`` policy with no ``model`` parameter loads
DEFAULT_MODEL = Path(__file__).with_name("models") / "learned.skops"


class ModelError(PolicyError):
    """A model file is missing, untrusted, of another format, or its labels are not points."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "policy-model")


def label_point(mode: Mode | str, epoch_ms: int | None = None) -> str:
    """The class label of a point: ``"colo"`` or ``"mc-<epoch_ms>"``."""
    if Mode(mode) is Mode.COLO:
        return "colo"
    if epoch_ms is None:
        raise ValueError("an MC label needs its epoch")
    return f"mc-{int(epoch_ms)}"


def parse_label(label: str) -> tuple[Mode, int | None]:
    match = _LABEL.match(label)
    if not match:
        raise ModelError(f"label {label!r} is not a point (colo or mc-<epoch_ms>)")
    if match.group(2) is None:
        return Mode.COLO, None
    epoch = int(match.group(2))
    if not EPOCH_MS_MIN <= epoch <= EPOCH_MS_MAX:
        raise ModelError(f"label {label!r}: epoch outside {EPOCH_MS_MIN}..{EPOCH_MS_MAX}")
    return Mode.MC, epoch


def features(window: Window, average_s: float) -> np.ndarray:
    """The model's input row for ``window``: FEATURES' means, log1p-scaled, then the presence flag."""
    row = []
    for name in FEATURES:
        value = window.mean(name, average_s)
        row.append(math.log1p(max(value, 0.0)) if value is not None else 0.0)
    row.append(1.0 if window.mean("div.per_s", average_s) is not None else 0.0)
    return np.array(row, dtype=np.float64)


@dataclass(frozen=True)
class LearnedModel:
    """A fitted pipeline with what it was trained on (kept in the file, shown by ``policy show``)."""

    pipeline: Any
    feature_names: tuple[str, ...]
    average_s: float
    samples: int
    source: str  # where the training windows came from (an experiment directory, say)
    # the workloads whose windows it learned from: an honest evaluation runs it on others only
    workloads: tuple[str, ...] = ()

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(str(c) for c in self.pipeline.classes_)

    def predict(self, row: np.ndarray) -> tuple[str, float, str]:
        """(label, its probability, the feature that pushed hardest towards it)."""
        probabilities = self.pipeline.predict_proba(row.reshape(1, -1))[0]
        k = int(np.argmax(probabilities))
        scaler, classifier = self.pipeline.steps[0][1], self.pipeline.steps[-1][1]
        scaled = scaler.transform(row.reshape(1, -1))[0]
        coef = classifier.coef_
        # binary logistic regression keeps one row of coefficients, for classes_[1]
        weights = coef[0] * (1 if k == 1 else -1) if coef.shape[0] == 1 else coef[k]
        contribution = weights * scaled
        driver = self.feature_names[int(np.argmax(contribution))]
        return self.labels[k], float(probabilities[k]), driver


def fit_model(
    rows: Sequence[np.ndarray] | np.ndarray,
    labels: Sequence[str],
    *,
    average_s: float,
    source: str = "",
    workloads: Sequence[str] = (),
) -> LearnedModel:
    """Fit the pipeline to feature rows (from :func:`features`) and their best-point labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(rows, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(FEATURES) + 1:
        raise ModelError(f"feature rows must have {len(FEATURES) + 1} columns, got shape {x.shape}")
    if len(labels) != x.shape[0]:
        raise ModelError(f"{x.shape[0]} rows but {len(labels)} labels")
    for label in set(labels):
        parse_label(label)
    if len(set(labels)) < 2:
        raise ModelError(f"training needs at least two different best points, got {sorted(set(labels))}")
    pipeline = Pipeline([("scale", StandardScaler()), ("classify", LogisticRegression(max_iter=2000))])
    pipeline.fit(x, list(labels))
    names = (*FEATURES, PRESENCE)
    return LearnedModel(
        pipeline, names, float(average_s), int(x.shape[0]), source, tuple(sorted(set(workloads)))
    )


def save_model(model: LearnedModel, path: Path) -> None:
    import skops.io as sio

    payload = {
        "format": MODEL_FORMAT,
        "pipeline": model.pipeline,
        "features": list(model.feature_names),
        "average_s": model.average_s,
        "samples": model.samples,
        "source": model.source,
        "workloads": list(model.workloads),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    sio.dump(payload, tmp)
    tmp.replace(path)


def load_model(path: Path) -> LearnedModel:
    """Load a model file, refusing untrusted types, another format or another feature list."""
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(file=path)
    except FileNotFoundError:
        raise ModelError(f"no model file at {path} (train one: hybridft experiment train DIR)") from None
    except Exception as exc:
        raise ModelError(f"{path} is not a skops model file: {exc}") from exc
    refused = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if refused:
        raise ModelError(f"{path} holds types a model may not hold: {', '.join(refused)}")
    try:
        payload = sio.load(path, trusted=sorted(set(untrusted)))
    except Exception as exc:
        raise ModelError(f"cannot load {path}: {exc}") from exc
    if not isinstance(payload, Mapping) or payload.get("format") != MODEL_FORMAT:
        raise ModelError(f"{path} is not a model of format {MODEL_FORMAT}")
    names = tuple(payload.get("features", ()))
    if names != (*FEATURES, PRESENCE):
        raise ModelError(f"{path} was trained on features {names}, this version uses {(*FEATURES, PRESENCE)}")
    model = LearnedModel(
        payload["pipeline"],
        names,
        float(payload["average_s"]),
        int(payload["samples"]),
        str(payload["source"]),
        tuple(str(w) for w in payload.get("workloads", ())),  # absent from files before it was kept
    )
    for label in model.labels:
        parse_label(label)
    return model


@dataclass(frozen=True)
class LearnedParams:
    model: str = param("", "model file (skops); empty: the one shipped in policies/models/learned.skops")
    min_confidence: float = param(0.6, "below this probability the current point stays", min=0.0, max=1.0)
    passive_secondary: bool = param(False, "MC with a passive secondary (loses the shadow div.per_s)")


class Learned(Policy[LearnedParams]):
    name = "learned"
    description = (
        "A classifier trained on experiment runs (hybridft experiment train) names the best point "
        "from workload signals; keeps the current point when unsure."
    )
    params_type = LearnedParams

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        super().__init__(params)
        path = Path(self.params.model) if self.params.model else DEFAULT_MODEL
        try:
            self.model = load_model(path)
        except ModelError as exc:
            raise PolicyConfigError(
                str(exc), "model", "a skops model file from hybridft experiment train"
            ) from exc

    def decide(self, window: Window) -> Decision:
        row = features(window, self.model.average_s)
        label, probability, driver = self.model.predict(row)
        mode, epoch = parse_label(label)
        shown = ", ".join(f"{n}={v:.3g}" for n, v in _shown(self.model.feature_names, row))
        if probability < self.params.min_confidence:
            return Decision(
                window.mode,
                window.epoch_ms,
                f"unsure: P({label})={probability:.2f} < {self.params.min_confidence:g}; keeps "
                f"{window.point.describe()} ({shown})",
                driver,
                window.passive_secondary,
            )
        return Decision(
            mode,
            epoch if epoch is not None else window.epoch_ms,
            f"P({label})={probability:.2f}, most of all from {driver} ({shown})",
            driver,
            self.params.passive_secondary and mode is Mode.MC,
        )


def _shown(names: Iterable[str], row: np.ndarray) -> list[tuple[str, float]]:
    """The features as measured (undoing log1p), for the reason text."""
    return [(n, math.expm1(v) if n != PRESENCE else v) for n, v in zip(names, row, strict=True)][:3]
