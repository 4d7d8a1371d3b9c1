"""Code the test modules share, one module per concern.

Test modules import from here and never from each other: a test module is collected (and its
fixtures registered) by pytest, so importing one from another runs its module-level setup twice
and drags its fixtures along.  Shared *fixtures* live in ``tests/conftest.py`` or in a plugin module
it registers (``daemon_harness``, ``marker_guard``).
"""
