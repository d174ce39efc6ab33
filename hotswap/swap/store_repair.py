"""Putting the store pointer right after the workers fell back from a changed store (and,
once refresh keeps a record, after a refresh that was killed): the store half of `recover`.

The workers already serve the fallback (hotswap/inside/live_store.py); what is left is the
pointer (`data/store/current`), which still names the broken file, so that a reload, a
restart or a respawned worker after the record is gone would open it again.
"""

from __future__ import annotations

from pathlib import Path

from ..protocol import store, store_state


def fallback_problem(run_dir: Path) -> str | None:
    """`status`: the fallback in force, with the command that ends it, or None."""
    fallback = store_state.Fallback.read(run_dir)
    if fallback is None:
        return None
    return (f"store fallback: {fallback.describe()}; `hotswap recover` points "
            f"{fallback.pointer} at {fallback.version}")


def repair_fallback(run_dir: Path) -> list[str]:
    """Re-point the pointer at the store the workers fell back to; forget the broken one."""
    fallback = store_state.Fallback.read(run_dir)
    if fallback is None:
        return []
    store.point(fallback.pointer, fallback.path)
    store_state.GoodStores.read(run_dir).without(fallback.broken_path).write(run_dir)
    store_state.clear_fallback(run_dir)
    return [f"pointed {fallback.pointer} at store {fallback.version} ({fallback.path}), "
            f"which the workers serve since {fallback.broken_version} "
            f"({fallback.broken_path}) changed under them: {fallback.cause}"]
