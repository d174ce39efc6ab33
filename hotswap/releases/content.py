"""What a release holds, as one digest: how `deploy --if-changed` tells that the release it
was given already serves, whatever folder or tarball (and whatever mtimes) it came in.

A fleet rollout hands every host the same release on every run; a host that already serves
it must do nothing (no swap, no new release folder). Release folders are immutable once in
place, so the serving one can be digested again at any time and needs no stored checksum.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# written by Python beside the modules a release imports: not part of what was shipped
NOT_CONTENT = {"__pycache__"}


def digest(folder: Path, skip_at_top: frozenset[str] | set[str] = frozenset()) -> str:
    """sha256 over every path under `folder` (sorted), its kind, and its bytes or link
    target; names in `skip_at_top` (what staging does not copy) are left out at the top.
    Modes and mtimes are left out too: a copy or an unpacked tarball of the same files has
    the same digest."""
    total = hashlib.sha256()
    for path in _walk(folder):
        if path.relative_to(folder).parts[0] in skip_at_top:
            continue
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink():
            total.update(f"L {relative} -> {os.readlink(path)}\n".encode())
        elif path.is_file():
            total.update(f"F {relative} {_file_digest(path)}\n".encode())
        elif path.is_dir():
            total.update(f"D {relative}\n".encode())
    return total.hexdigest()


def _walk(folder: Path) -> list[Path]:
    found = []
    for top, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in NOT_CONTENT)
        base = Path(top)
        # a symlink to a folder is listed in dirs but not followed: its target is content
        found += [base / name for name in sorted(names + dirs)]
    return sorted(found)


def _file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()
