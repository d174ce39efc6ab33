"""The refresh record: where a `hotswap refresh` stands, written before each irreversible act.

`hotswap refresh` writes `<run_dir>/store-refresh.json`; the workers (inside/live_store.py),
`recover`, `status` and the next `refresh`/`reload` read it:

    (validate, app check: nothing written, nothing changed)
    SWITCHING -> COMMITTED -> DONE
        \\-> ROLLING_BACK -> ROLLED_BACK

SWITCHING     the pointer is about to name the new store and the workers about to be told.
              Before the commit point: an interrupt, a failure or a timeout rolls back.
ROLLING_BACK  the pointer is about to name the old store again and the workers to be told.
COMMITTED     the commit point: every worker of the live master reported the new store.
              From here nothing rolls back; whoever finds it finishes (remembers the store as
              good, clears a fallback, writes DONE).

A refresh killed (SIGKILL) in SWITCHING or ROLLING_BACK leaves its record with a dead pid:
a respawned worker then serves the record's *old* store, never the half-switched pointer, and
`recover` or the next refresh/reload (they hold the reload lock, so the refresh that wrote it
is gone) points back and switches every worker back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..system import files, procs

RECORD_NAME = "store-refresh.json"


class Phase(str, Enum):
    SWITCHING = "switching"
    ROLLING_BACK = "rolling-back"
    ROLLED_BACK = "rolled-back"
    COMMITTED = "committed"
    DONE = "done"


UNFINISHED = frozenset({Phase.SWITCHING, Phase.ROLLING_BACK, Phase.COMMITTED})


@dataclass(frozen=True)
class StoreSwitch:
    phase: Phase
    pointer: str  # the symlink the workers follow
    old_path: str
    old_version: str
    old_sha256: str
    new_path: str
    new_version: str
    new_sha256: str
    pid: int  # the refresh (or repair) that writes it
    at: float = 0.0

    def to(self, phase: Phase) -> StoreSwitch:
        return dataclasses.replace(self, phase=phase, pid=os.getpid(), at=time.time())

    @property
    def orphaned(self) -> bool:
        """Unfinished, and the process that was to finish it is gone."""
        return self.phase in UNFINISHED and not procs.alive(self.pid)

    def store_for_workers(self) -> str | None:
        """The store a worker opens instead of following the pointer, or None (follow it):
        an orphaned switch before its commit point is going back to the old store; from
        the commit point on, the new one is what serves."""
        if not self.orphaned:
            return None
        return self.new_path if self.phase is Phase.COMMITTED else self.old_path

    @classmethod
    def read(cls, run_dir: str | os.PathLike) -> StoreSwitch | None:
        try:
            data = json.loads((Path(run_dir) / RECORD_NAME).read_text())
            return cls(**{**data, "phase": Phase(data["phase"])})
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, run_dir: str | os.PathLike) -> None:
        files.atomic_write(Path(run_dir) / RECORD_NAME,
                           json.dumps({**dataclasses.asdict(self), "phase": self.phase.value}),
                           owner_of=Path(run_dir))
