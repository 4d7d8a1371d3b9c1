"""Mode-selection policies: ``Policy.decide(window) -> Decision(mode, epoch_ms)``.

Policies are plain classes registered under the ``hybridft.policies`` entry-point group.
"""
