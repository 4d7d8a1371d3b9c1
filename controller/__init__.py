"""The hybridft controller: the daemon, its control API and the ``hybridft`` operator CLI.

The controller owns *when* things happen (epochs, mode switches, failover); the other packages own
*how* (``colo_compare`` compares and holds output, ``disk_buffer`` holds disk writes per epoch,
``mc_driver`` talks to QEMU).  ``hybridft_common.endpoints`` and ``hybridft_common.control`` are the two small
pieces every service shares: the address syntax and the JSON-lines control protocol.
"""
