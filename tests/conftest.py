"""Suite-wide settings.

Hypothesis deadlines are timing assertions: on a loaded 2-core CI machine a correct example can take
longer than 200 ms, and speed goals belong in benchmarks (``hybridft bench``), not in tests.  So the
suite runs hypothesis without deadlines; everything else about the properties is unchanged.
"""

from hypothesis import settings

settings.register_profile("hybridft", deadline=None)
settings.load_profile("hybridft")
