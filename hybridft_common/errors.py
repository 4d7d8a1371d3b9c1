"""The base of every refusal that crosses a process boundary.

A refusal carries a human message and a short, stable ``code`` for scripts.  The contract behind it
(every verb of every service): a refused request changed nothing.  The sans-I/O cores raise their own
subclasses (the disk store's :class:`~disk_buffer.store.DiskBufferError`, ...), so they need not know
about the wire; the control protocol turns any of them into an ``ok: false`` reply.
"""

from __future__ import annotations


class HybridftError(Exception):
    """A refused request: ``code`` is stable for scripts, ``message`` is for people."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
