"""Writing the kit's small state files so that no reader ever sees half of one, and the
one time format they (and `status --json`) use."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# the run dir as `hotswap start` resolved it, exported to uWSGI and so to every generation
# (the store's worker reports and the loading priority read it)
RUN_DIR_ENV = "HOTSWAP_RUN_DIR"


@contextmanager
def beside(path: os.PathLike | str) -> Iterator[str]:
    """A temporary name beside `path` for the caller to write and then os.replace() over it;
    removed if the block fails, so no half-written file is ever left (one place for the
    pattern: the state files below, the data stores of store.py)."""
    tmp = f"{os.fspath(path)}.tmp.{os.getpid()}"
    try:
        yield tmp
    except BaseException:
        try:
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp)  # a release directory being staged (release.py)
            else:
                os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write(path: os.PathLike | str, text: str, owner_of: Path | None = None) -> None:
    """Write beside, then rename over `path`.

    With `owner_of` (a folder), a file root creates there is handed to that folder's owner,
    so the service user (systemd's ExecReload runs as it) can replace it later.
    """
    with beside(path) as tmp:
        with open(tmp, "w") as handle:
            handle.write(text)
        if owner_of is not None:
            give_to_owner_of(tmp, owner_of)
        os.replace(tmp, path)


def give_to_owner_of(path: os.PathLike | str, folder: Path) -> None:
    """When root creates a file in the service's run dir, hand it to the dir's owner (the
    service user), so the service's own `hotswap reload` (ExecReload) can still write it."""
    if os.geteuid() != 0:
        return
    owner = os.stat(folder)
    if owner.st_uid != 0:
        os.chown(path, owner.st_uid, owner.st_gid)


def iso_time(epoch: float | None = None) -> str:
    """UTC, ISO 8601, to the second: the one format of every `*_at` field the kit writes
    (the same as srv.py's `loaded_at`). None: now."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
