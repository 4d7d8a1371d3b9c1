"""The shared disk buffer layer: the secondary's side of disk replication, used by MC and COLO alike.

A sans-I/O epoch store (speculation -> sealed -> committed journal -> applied image, plus the
secondary VM's overlay), a crash-safe redo journal, an asyncio NBD server and a control socket.
"""
