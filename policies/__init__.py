"""Mode-selection policies: ``Policy.decide(window) -> Decision(mode, epoch_ms, reason, signal)``.

* ``window`` -- the contract with the daemon's sampler: :class:`Window` (immutable signals, the
  operating point) and :class:`SignalRing` (the bounded store the daemon appends samples to);
* ``base`` -- :class:`Decision`, the :class:`Policy` base and typed, validated parameters;
* built-ins -- ``static`` (static-mc, static-colo), ``gilbert`` (Gilbert's COLO hybrid mode, the
  baseline), ``threshold``, ``cost_model``;
* ``registry`` -- the built-ins and the ``hybridft.policies`` entry points of other packages;
* ``guard`` -- :class:`PolicyGuard`, dwell/budget/hysteresis/sanity between any policy and the pair;
* ``trace`` -- the JSON-lines decision trace and its replay; ``cli`` -- ``hybridft policy ...``.

Everything here is pure (no I/O but the trace file reader, no clock): a trace replays exactly.
"""

from policies.base import Decision, Failure, Policy, PolicyConfigError, PolicyError, PolicyLike
from policies.guard import GuardConfig, GuardVerdict, PolicyGuard, VerdictKind
from policies.registry import PolicyInfo, list_policies, load_policy
from policies.trace import TraceRecord, make_record, read_trace, replay
from policies.window import ProtectionPoint, SignalRing, Window

__all__ = [
    "Decision",
    "Failure",
    "GuardConfig",
    "GuardVerdict",
    "Policy",
    "PolicyConfigError",
    "PolicyError",
    "PolicyGuard",
    "PolicyInfo",
    "PolicyLike",
    "ProtectionPoint",
    "SignalRing",
    "TraceRecord",
    "VerdictKind",
    "Window",
    "list_policies",
    "load_policy",
    "make_record",
    "read_trace",
    "replay",
]
