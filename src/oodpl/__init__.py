"""oodpl: out-of-distribution preference learning with a meta-learned general reward model.

Layout mirrors the method (see docs/architecture.md):
data -> models -> objectives -> policy_opt (shared RLOO step) -> metatrain (bilevel) -> metatest -> evaluate -> benchmark.
"""

__version__ = "0.1.0"
