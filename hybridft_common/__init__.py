"""The ground floor: what every hybridft service shares, and nothing that knows about any one of them.

* ``endpoints`` -- the ``unix:PATH`` / ``tcp:HOST:PORT`` address syntax and listening/connecting on it;
* ``control`` -- the JSON-lines control protocol every service speaks on its control socket;
* ``errors`` -- the base of every refusal that carries a stable code;
* ``vocabulary`` -- the one definition of replication modes, stop ways and epoch limits;
* ``manifest`` -- ``pair.json``, the typed contract between the launcher and the pair's processes;
* ``stats`` -- the one percentile/summary helper (status, benchmarks, experiments);
* ``cli`` -- the lazy click group and how to start ``hybridft`` as a child process.

Import rule: this package imports no other hybridft package; every other package may import it.
"""
