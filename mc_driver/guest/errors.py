"""The guest's errors: one base class for every seam of :mod:`mc_driver.guest`.

Why a module of its own: the image build, the parsers of the workloads' output and the control-channel
client each raise a :class:`GuestError`, and none of them should import another seam only for a base
class.  Callers that do not care which seam failed catch :class:`GuestError`.
"""

from __future__ import annotations


class GuestError(Exception):
    """Base class of every error the guest package raises."""


class GuestBuildError(GuestError):
    """The guest could not be built (missing tool, package, compile error)."""


class GuestControlError(GuestError):
    """The control channel failed: no connection, timeout, or a command the guest rejected."""


class GuestControlTimeout(GuestControlError):
    """The guest did not answer in time."""
