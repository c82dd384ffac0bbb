"""One-line progress notes on stderr for the slow steps that have no bar (loading models, warm starts):
`oodpl: loading the policy smollm2-135m-instruct ...` then `... done in 3.1 s`. They are INFO records of the `oodpl`
logger, which the CLI prints unless --quiet (then only warnings)."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("oodpl.runtime.progress")


@contextmanager
def step(what: str) -> Iterator[None]:
    """Say `what` is starting, then how long it took."""
    log.info("%s ...", what)
    t0 = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", what, time.perf_counter() - t0)


def configure_cli_logging(quiet: bool) -> None:
    """The CLI's handler for the `oodpl` loggers: INFO notes (progress, choices made for the user) and warnings on
    stderr as `oodpl: ...`; --quiet keeps warnings only."""
    logger = logging.getLogger("oodpl")
    for h in list(logger.handlers):
        if getattr(h, "oodpl_cli", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("oodpl: %(message)s"))
    handler.oodpl_cli = True
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
