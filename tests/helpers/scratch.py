"""Where the disk tests keep state they crash and recover thousands of times."""

from __future__ import annotations

from pathlib import Path

# kill -9 loses nothing the kernel already holds, so a tmpfs models it exactly -- and there the
# thousands of fdatasyncs of these tests cost nothing, instead of 5-50 ms each on the shared disk.
RAM_DIR = Path("/dev/shm")
