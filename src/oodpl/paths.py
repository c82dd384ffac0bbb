"""Names that come from data or config and become parts of paths (domains, methods, run names).

Data files are untrusted input: a domain named `../../x` must not make a run write outside its `--output`. Every
such name goes through `safe_name`, which accepts it only when it is one plain path component that cannot collide
with the files oodpl writes itself (hidden `.step-N.tmp`, `.oodpl.lock`, ...), and refuses it with one line
otherwise; `inside` builds a path from safe names and checks that it lands inside its root.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from oodpl.errors import UserError

MAX_NAME_BYTES = 120  # a name plus our suffixes (beta_0.1, .pt, .json) stays under the usual 255-byte limit
# control characters, surrogates (not encodable as a file name), line and paragraph separators
_BAD_CATEGORIES = {"Cc", "Cs", "Zl", "Zp"}


def name_problem(name: object) -> str | None:
    """Why `name` cannot be one path component (a phrase), or None when it can."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name.strip():
        return "is empty"
    if name in (".", ".."):
        return "is a relative path step"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if name.startswith("."):
        return "starts with a dot (hidden files are oodpl's own temporaries)"
    if name != name.strip():
        return "starts or ends with white space"
    bad = next((c for c in name if unicodedata.category(c) in _BAD_CATEGORIES), None)
    if bad is not None:
        return f"contains the control or invalid character U+{ord(bad):04X}"
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long (at most {MAX_NAME_BYTES} in UTF-8)"
    return None


def safe_name(name: object, what: str = "domain", where: str = "") -> str:
    """`name` unchanged when it is safe as one file name (see `name_problem`); else a one-line UserError naming
    `where` (file:line or config key) and what to do."""
    problem = name_problem(name)
    if problem is None:
        return name  # type: ignore[return-value]
    shown = repr(name)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    prefix = f"{where}: " if where else ""
    raise UserError(f"{prefix}{what} name {shown} {problem}; it becomes a directory or file name, so use a plain "
                    f"name (letters, digits, spaces, - _ . ; not starting with a dot, at most {MAX_NAME_BYTES} bytes)")


def inside(root: str | os.PathLike, *names: str, what: str = "domain") -> Path:
    """root / names[0] / ... with every name checked by `safe_name` and the result checked to lie inside `root`
    (after resolving symbolic links): where a name from data or config becomes a path."""
    root = Path(root)
    path = root.joinpath(*(safe_name(n, what) for n in names))
    base = root.resolve()
    resolved = path.resolve()
    if resolved != base and base not in resolved.parents:
        raise UserError(f"{path} would be written outside {root} (a symbolic link leads out); remove the link or "
                        "choose another --output")
    return path
