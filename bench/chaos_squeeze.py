"""The chaos soak's two faults that are no signal: the run dir's disk filling up, and the new
generation OOM-killed in a memory cgroup of its own (bench/chaos_rig.py lands them).

Both act on real kernel objects that this process makes and always removes: a small tmpfs
mounted on the instance's run dir (unmounted at the end, lazily if a process still holds
it), and child memory cgroups of the instance's own (emptied into their parent and removed
once the swap is over). Nothing here touches anything the instance did not start in.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

from hotswap.system import memory, procs

RUN_DIR_BYTES = 8 << 20  # the run dir's records, FIFOs and sockets need a few KiB
FILLER = "chaos-filler"
CHUNK = 64 << 10
# The new master's cgroup limit: far below what a Python import of the release needs (tens
# of MiB), so its next allocations (or those of the first worker or hook it forks) meet it.
OOM_LIMIT = 2 << 20


class RunDirDisk:
    """A tmpfs of RUN_DIR_BYTES mounted on `run_dir`, that fill() fills to the last byte."""

    def __init__(self, run_dir: Path, size: int = RUN_DIR_BYTES) -> None:
        self.run_dir = run_dir
        self.filler = run_dir / FILLER
        run_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                        str(run_dir)], check=True, capture_output=True, text=True)
        self.mounted = True

    def fill(self) -> int:
        """Write the filler until the disk is full (ENOSPC); returns the bytes written."""
        written = 0
        chunk = b"\0" * CHUNK
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while chunk:  # unbuffered: each ENOSPC is seen where it happens
                try:
                    written += os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    chunk = chunk[:len(chunk) // 2]  # the last few bytes too
        finally:
            os.close(fd)
        return written

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        """Called once the instance's processes are gone; lazily if one still holds it."""
        if not self.mounted:
            return
        done = subprocess.run(["umount", str(self.run_dir)], capture_output=True)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(self.run_dir)], check=True,
                           capture_output=True)
        self.mounted = False


class OomTrap:
    """Child memory cgroups (v1 or v2) of the cgroup the instance runs in; trap(pid) moves a
    process into a fresh one limited to OOM_LIMIT."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.groups: list[tuple[Path, Path, str]] = []  # (child, parent, limit file)

    def trap(self, pid: int, limit: int = OOM_LIMIT) -> str:
        """Move `pid` into a new cgroup whose limit is `limit`; '' if it could not be."""
        group = memory.cgroup_of(pid)
        if group is None:
            return "no memory cgroup to make a child of"
        child = group.path / f"{self.name}-{pid}"
        limit_file = "memory.limit_in_bytes" if group.version == 1 else "memory.max"
        try:
            child.mkdir()
            self.groups.append((child, group.path, limit_file))
            (child / limit_file).write_text(str(limit))
            (child / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            return f"cannot trap {pid} in {child}: {exc.strerror}"
        return ""

    def release(self, timeout: float = 30.0) -> None:
        """Lift each trap's limit, move what lives in it back to its parent, remove it."""
        for child, parent, limit_file in self.groups:
            try:
                (child / limit_file).write_text("-1" if limit_file.endswith("bytes")
                                                else "max")
            except OSError:
                pass  # already gone
            procs.wait_until(lambda c=child, p=parent: _emptied(c, p), timeout, interval=0.05)
            try:
                os.rmdir(child)
            except FileNotFoundError:
                pass
        self.groups.clear()


def _emptied(child: Path, parent: Path) -> bool:
    """Move every process of `child` to `parent`; True once none is left (a dying one
    leaves the cgroup only when its exit completes)."""
    try:
        pids = (child / "cgroup.procs").read_text().split()
    except FileNotFoundError:
        return True
    for pid in pids:
        try:
            (parent / "cgroup.procs").write_text(pid)
        except OSError:
            pass  # exiting: it leaves by itself
    return not pids
