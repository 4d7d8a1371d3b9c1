"""The output comparator: QEMU net-filter frame transport and a sans-I/O stream comparator.

See ARCHITECTURE.md section 4.  The core (``colo_compare.core``) is fed primary and secondary
frames and returns actions; it never touches a socket.  The asyncio shell (``colo_compare.transport``
and ``colo_compare.serve``) only moves bytes between QEMU's filters and the core.
"""
