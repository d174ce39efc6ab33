"""The store half of `recover` and `status`: a refresh that was killed (store_switch.py undoes
or finishes it), and a fallback from a store that changed under the workers.

After a fallback the workers already serve the last good store (hotswap/inside/live_store.py);
what is left is the pointer (`data/store/current`), which still names the broken file, so that
a reload, a restart, or a respawned worker once the record is gone would open it again.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import Config
from ..protocol import store, store_state
from ..protocol.store_record import StoreSwitch
from .store_switch import repair_switch


def store_problems(run_dir: Path) -> list[str]:
    """`status`: a killed refresh, a fallback in force; each with the command that ends it."""
    found = []
    switch = StoreSwitch.read(run_dir)
    if switch is not None and switch.orphaned:
        found.append(f"a refresh to store {switch.new_version} (pid {switch.pid}) was killed "
                     f"in its {switch.phase.value} phase; `hotswap recover` "
                     + ("finishes it" if switch.phase.value == "committed" else
                        f"switches every worker back to {switch.old_version}"))
    fallback = store_state.Fallback.read(run_dir)
    if fallback is not None:
        found.append(f"store fallback: {fallback.describe()}; `hotswap recover` points "
                     f"{fallback.pointer} at {fallback.version}")
    return found


def repair_store(cfg: Config) -> list[str]:
    """What recover does for the store (the caller holds the reload lock)."""
    return [*repair_switch(cfg), *repair_fallback(cfg.run_dir)]


def repair_fallback(run_dir: Path) -> list[str]:
    """Re-point the pointer at the store the workers fell back to; forget the broken one."""
    fallback = store_state.Fallback.read(run_dir)
    if fallback is None:
        return []
    store_state.GoodStores.read(run_dir).without(fallback.broken_path).write(run_dir)
    store_state.clear_fallback(run_dir)
    if os.path.realpath(fallback.pointer) != fallback.broken_path:
        # someone pointed it elsewhere since: theirs to choose, not ours to undo
        return [f"cleared the fallback from {fallback.broken_version}: {fallback.pointer} "
                "no longer names it"]
    store.point(fallback.pointer, fallback.path)
    return [f"pointed {fallback.pointer} at store {fallback.version} ({fallback.path}), "
            f"which the workers serve since {fallback.broken_version} "
            f"({fallback.broken_path}) changed under them: {fallback.cause}"]
