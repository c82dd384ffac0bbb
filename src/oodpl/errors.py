"""User-facing errors and atomic file output.

Every problem a user can cause (bad file, bad config, missing model, ...) raises `UserError`; the CLI prints its one
line and exits with status 2. Output is written to a temporary path and renamed, so nothing is ever half-written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

EXIT_USER_ERROR = 2


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode open() would give a new file under the process umask (0644 by default); mkstemp uses 0600."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode mkdir() would give a new directory under the process umask (0755 by default); mkdtemp uses 0700."""
    return 0o777 & ~_umask()


DISK_FULL_FREE_BYTES = 1 << 20  # less free space than this right after a failed write: the write ran out of space


def _disk_full_text(text: str) -> bool:
    return any(k in text for k in ("No space left on device", "os error 28", "code: 28", "file write failed"))


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space on the file system holding `path` (or its nearest existing parent); None when unknown."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_full(e: BaseException, path: str | os.PathLike | None = None) -> bool:
    """A write that failed for lack of space: ENOSPC, a library's wrapper that says so, or (torch.save's "unexpected
    pos ..." RuntimeError names no cause) any failed write while the file system holding `path` is all but full.
    Call it before removing what the failed write left, or the free space measured is what the removal gave back."""
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or _disk_full_text(str(e)):
        return True
    if path is None or not isinstance(e, (OSError, RuntimeError)):
        return False
    free = free_bytes(path)
    return free is not None and free < DISK_FULL_FREE_BYTES


def describe_failure(e: BaseException, after: str = "") -> str | None:
    """One line for a failure of the file system (an OSError, or a library's wrapper of one: torch.save reports a
    full disk as RuntimeError, safetensors as its own error type); None for anything else (a bug: traceback).
    `after` ends a disk-full line with the advice that fits the run's state (e.g. how to resume)."""
    text = str(e)
    where = e.filename if isinstance(e, OSError) and e.filename else None
    if is_disk_full(e, where):
        named = f"while writing {where}" if where else f"({(text.splitlines() or [''])[0][:160]})"
        return f"no space left on device {named}; free some space and rerun{after}"
    if isinstance(e, OSError):
        reason = (e.strerror or text or type(e).__name__).lower()
        return f"{where or 'a file'}: {reason}; check the path, its permissions and the disk"
    return None


def write_failed(path: str | os.PathLike, e: BaseException, after: str = "", full: bool | None = None) -> "UserError":
    """One line for an OSError (disk full, permission, ...) while writing `path`; `full`: whether the disk was found
    full (measured before the failed write's leftovers were removed; None: measure now)."""
    if full or (full is None and is_disk_full(e, path)):
        reason = "no space left on device"
    elif isinstance(e, OSError) and e.strerror:
        reason = e.strerror.lower()
    else:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
    hint = "free some space" if "space" in str(reason).lower() else "check the path and its permissions"
    return UserError(f"could not write {path} ({reason}); {hint} and rerun{after}")


def with_filename(e: OSError, path: str | os.PathLike) -> OSError:
    """`e` naming `path` when it names no file (a failed write() or flush() says only "No space left on device")."""
    if e.filename is None:
        e.filename = str(path)
    return e


def decode_strict(raw: bytes, path: str | os.PathLike, encoding: str = "utf-8",
                  fix: str = "save the file as UTF-8") -> str:
    """Strict decoding: a byte that is not valid in `encoding` is a one-line error naming its line and byte offset
    (never a silent switch to another encoding); `fix` says how to repair it. A UTF-8 byte-order mark is dropped."""
    try:
        return raw.decode("utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding)
    except LookupError:
        raise UserError(f"data.encoding {encoding!r} is not a known text encoding; use utf-8 or, for example, "
                        "latin-1 or cp1252") from None
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: byte 0x{raw[e.start]:02x} at byte offset {e.start} is not valid {encoding} "
                        f"({e.reason}); {fix}") from None


def follow_umask(directory: str | os.PathLike) -> None:
    """Give every file and directory under `directory` the mode the umask gives new ones: libraries that write
    through temporary files (safetensors, huggingface_hub) leave 0600 behind."""
    fmode, dmode = file_mode(), dir_mode()
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            os.chmod(os.path.join(root, d), dmode)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, fmode)


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong, where, and how to fix it."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    os.chmod(tmp, dir_mode())
    try:
        yield tmp
        follow_umask(tmp)
    except BaseException as e:
        full = isinstance(e, Exception) and not isinstance(e, UserError) and is_disk_full(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise write_failed(final, e, full=True) from e  # also a library's wrapped disk-full error: name the path
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


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf value of a nested mapping."""
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def fingerprint_diff(held: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two fingerprints: key -> (held, new)."""
    a, b = _flat(held), _flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _mark_run_dir(path: Path, kind: str, fingerprint: dict, extendable: tuple[str, ...] = (),
                  resume: bool = False) -> None:
    """Claim `path` for this run (see claim_run_dir): an empty or new directory is claimed, one that holds the same
    run is reused (resume), one that holds a different run or unrelated files is refused. `extendable`: keys (budgets
    such as meta.outer_steps) that a --resume may change in a run it continues; the marker then records the new
    values."""
    marker = path / RUN_MARKER
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if marker.exists():
        try:
            held = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            raise UserError(f"{marker} is unreadable; remove the directory {path} or choose another --output") from None
        new = json.loads(json.dumps(fingerprint, default=str))
        if held.get("kind") != kind:
            raise UserError(f"output directory {path} already holds a {held.get('kind', 'oodpl')} run, not a {kind} "
                            "run; choose another --output or delete it")
        diff = fingerprint_diff(held.get("fingerprint") or {}, new)
        if not diff:
            return
        shown = "; ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in list(diff.items())[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        budget_only = all(k in extendable for k in diff)
        if budget_only and resume:
            atomic_write_json(marker, {"kind": kind, "fingerprint": fingerprint})
            return
        hint = ("; only budget settings differ: add --resume to extend the run" if budget_only and extendable
                else "; choose another --output, or delete it")
        raise UserError(f"output directory {path} already holds a different {kind} run ({shown}{more}){hint}")
    if entries:
        raise UserError(
            f"output directory {path} is not empty and holds no oodpl run; choose an empty or new --output"
        )
    atomic_write_json(marker, {"kind": kind, "fingerprint": fingerprint})


LOCK_NAME = ".oodpl.lock"


class RunClaim:
    """An output directory held by this process for one run (see `claim_run_dir`)."""

    def __init__(self, path: str | os.PathLike, kind: str, fingerprint: dict, enabled: bool = True,
                 extendable: tuple[str, ...] = (), resume: bool = False):
        self.path, self.kind, self.fingerprint, self.enabled = Path(path), kind, fingerprint, enabled
        self.extendable, self.resume = tuple(extendable), resume
        self.committed = False
        self._lock_file = None
        self._created: list[Path] = []  # directories this claim created, deepest first
        self._before: set[str] = set()

    def __enter__(self) -> "RunClaim":
        if not self.enabled:
            return self
        path = self.path
        if path.exists() and not path.is_dir():
            raise UserError(f"output path {path} exists and is not a directory; choose another --output")
        p = path
        while not p.exists() and p != p.parent:
            self._created.append(p)
            p = p.parent
        try:
            check_writable_dir(path)
            self._before = {e.name for e in path.iterdir()}
            self._lock()
            _mark_run_dir(path, self.kind, self.fingerprint, self.extendable, self.resume)
        except BaseException:
            self._rollback()
            self._unlock()
            raise
        return self

    def commit(self) -> None:
        """Start-up is over: from here on a failure keeps what was written (a later --resume continues it)."""
        self.committed = True

    def __exit__(self, typ, exc, tb) -> bool:
        try:
            if typ is not None and self.enabled and not self.committed:
                self._rollback()
        finally:
            self._unlock()
        return False

    def _lock(self) -> None:
        lock_path = self.path / LOCK_NAME
        f = open(lock_path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"output directory {self.path} is in use by another oodpl process (pid {holder}); "
                                "wait for it to finish, stop it, or choose another --output") from None
            raise
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        except OSError as e:
            with contextlib.suppress(OSError):  # closing flushes the same buffer again
                f.close()
            raise with_filename(e, lock_path)
        self._lock_file = f

    def _unlock(self) -> None:
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def _rollback(self) -> None:
        """Remove what this start created: new entries of the directory, then the directories it made."""
        if self.path.is_dir():
            for entry in self.path.iterdir():
                if entry.name in self._before:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()
        for d in self._created:
            with contextlib.suppress(OSError):
                d.rmdir()


def claim_run_dir(path: str | os.PathLike, kind: str, fingerprint: dict, enabled: bool = True,
                  extendable: tuple[str, ...] = (), resume: bool = False) -> RunClaim:
    """Hold an output directory for one run; use as a context manager around the whole run:

        with claim_run_dir(out, "meta-test", fingerprint, enabled=accelerator.is_main_process) as run:
            ...start-up: load and check everything that can fail...
            run.commit()
            ...the long work...

    On entry: refuse a directory that holds a different run or unrelated files (we never overwrite somebody's
    results; one that holds the same run is reused: resume), take an advisory lock (`fcntl.flock` on `.oodpl.lock`,
    which records our pid) that a second process on the same directory fails to get (UserError naming the holder's
    pid), and write the run marker. If the block raises before `commit()`, everything the start created is removed
    (new entries, and the directory itself if it was created), so a failed start leaves the directory as it found
    it. The lock is released when the block ends. `enabled=False` (non-main processes) does nothing. A directory
    holding a run whose fingerprint differs only in `extendable` keys is claimed when `resume` (the marker takes the
    new values); any other difference is refused with a line naming the differing keys.
    """
    return RunClaim(path, kind, fingerprint, enabled, extendable, resume)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync, then rename: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise with_filename(e, path)
        raise
