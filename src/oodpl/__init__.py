"""oodpl: out-of-distribution preference learning with a meta-learned general reward model.

The Python API (oodpl.api; the same code as the CLI commands):

    from oodpl import load_config, meta_train, train_reward_model, align, generate, benchmark, leverage_study

Packages follow the method (see docs/architecture.md): data -> models -> core (objectives, the shared RLOO step,
the bilevel step) -> train (meta-training, the other reward models) -> adapt (meta-test) -> evaluation ->
experiment (methods, benchmark, report); runtime below them all, cli on top.
"""

__version__ = "0.1.0"

_API = {"Config": "config", "load_config": "config", "with_overrides": "config", "as_config": "api",
        "meta_train": "api", "train_reward_model": "api", "align": "api", "generate": "api", "benchmark": "api",
        "leverage_study": "api", "METHODS": "experiment.methods", "UserError": "errors"}
__all__ = sorted(_API)


def __getattr__(name: str):
    """Import on first use: `import oodpl` stays light (no torch) until a stage is called."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"oodpl.{_API[name]}"), name)
    raise AttributeError(f"module 'oodpl' has no attribute {name!r}")
