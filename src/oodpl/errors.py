"""User-facing errors and atomic file output.

Every problem a user can cause (bad file, bad config, missing model, ...) raises `UserError`; the CLI prints its one
line and exits with status 2. Output is written to a temporary path and renamed, so nothing is ever half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong, where, and how to fix it."""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same directory and an atomic rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name next to `final`; rename it into place only on success.

    If `final` exists already it is replaced only after the new one is complete (old one moved aside, then removed).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed and make sure we can write there; raise UserError otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".oodpl-write-probe-", delete=True)
        probe.close()
    except OSError as e:
        raise UserError(
            f"output directory {path} is not writable ({e.strerror}); choose another --output or fix its permissions"
        ) from None
    return path


RUN_MARKER = "oodpl_run.json"


def prepare_run_dir(path: str | os.PathLike, kind: str, fingerprint: dict, resume: bool = False) -> Path:
    """Claim an output directory for a run of `kind` whose identity is `fingerprint` (the resolved config).

    An empty or new directory is claimed. A directory that already holds the same run is reused (resume). A directory
    that holds a different run, or unrelated files, is refused: we never overwrite somebody's results.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"output path {path} exists and is not a directory; choose another --output")
    check_writable_dir(path)
    marker = path / RUN_MARKER
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if marker.exists():
        try:
            held = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            raise UserError(f"{marker} is unreadable; remove the directory {path} or choose another --output") from None
        if held.get("kind") != kind or held.get("fingerprint") != json.loads(json.dumps(fingerprint, default=str)):
            raise UserError(
                f"output directory {path} already holds a different {held.get('kind', 'oodpl')} run; "
                "choose another --output or delete it"
            )
        return path
    if entries:
        raise UserError(
            f"output directory {path} is not empty and holds no oodpl run; choose an empty or new --output"
        )
    atomic_write_json(marker, {"kind": kind, "fingerprint": fingerprint})
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync, then rename: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
