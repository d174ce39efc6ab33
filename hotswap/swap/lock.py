"""The reload lock: one swap (or stop, or recover) at a time, refused at once otherwise."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from ..config import Config
from ..errors import ExitCode, HotswapError
from ..system import files, procs

# `status` peeks at the lock for an instant; a reload that starts in that instant retries
# briefly rather than being refused.
CONTENTION_SECONDS = 0.2
# A reload SIGKILLed a moment ago (an operator's or systemd's retry at once) still holds the
# lock until the kernel has finished its exit, which a busy machine can stretch past
# CONTENTION_SECONDS: while the pid it wrote is gone or exiting, the lock is taken over as
# soon as the kernel frees it, rather than refused as busy.
DYING_HOLDER_SECONDS = 10.0


def _try_lock(handle, mode: int) -> bool:
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False


# What each caller refuses to do when it finds the lock held -> the command it is itself,
# as a refusal names the holder ("a deploy is in progress").
COMMANDS = {"start another": "reload", "roll back": "rollback"}


@dataclass(frozen=True)
class Holder:
    """Who holds the reload lock: written into the lock file once it is taken (the flock,
    not the text, is the lock; the text only names the holder to whoever is refused)."""

    pid: int
    command: str  # reload, deploy, rollback, refresh, stop, recover
    argv: str  # its command line, without --ini (for the operator)

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        text = text.strip()
        if text.isdigit():  # written by an older kit: the pid alone
            return cls(int(text), "reload", "")
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None

    @classmethod
    def me(cls, action: str) -> Holder:
        args = sys.argv[1:]
        if "--ini" in args[:-1]:
            at = args.index("--ini")
            del args[at:at + 2]
        return cls(os.getpid(), COMMANDS.get(action, action), shlex.join(["hotswap", *args]))

    def describe(self) -> str:
        shown = f", `{self.argv}`" if self.argv else ""
        return f"a {self.command} is in progress (pid {self.pid}{shown})"


@contextmanager
def reload_lock(cfg: Config, action: str) -> Iterator[None]:
    """Exclusive; if someone holds it, HotswapError(BUSY) naming its command and pid."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(cfg.lock_file, "a+")  # noqa: SIM115 - held for the whole block
    try:
        if not procs.wait_until(lambda: _try_lock(handle, fcntl.LOCK_EX), CONTENTION_SECONDS) \
                and not _after_dying_holder(handle):
            handle.seek(0)
            holder = Holder.parse(handle.read())
            busy = holder.describe() if holder else "a reload is in progress (pid unknown)"
            raise HotswapError(f"{busy}; refusing to {action}", ExitCode.BUSY)
        files.give_to_owner_of(cfg.lock_file, cfg.run_dir)
        handle.seek(0)
        handle.truncate()
        try:  # unbuffered: a failed write must not come back when the handle closes
            os.write(handle.fileno(), json.dumps(asdict(Holder.me(action))).encode())
        except OSError:
            pass  # a full run dir: the flock is held all the same, only the "who" is missing
        yield
    finally:
        handle.close()


def _after_dying_holder(handle) -> bool:
    """True once the lock is ours, if the pid that holds it is gone or exiting."""
    def recorded() -> int | None:
        handle.seek(0)
        holder = Holder.parse(handle.read())
        return holder.pid if holder else None

    def taken_or_refused():
        if _try_lock(handle, fcntl.LOCK_EX):
            return "taken"
        pid = recorded()
        return None if pid and (not procs.alive(pid) or procs.exiting(pid)) else "refused"

    return procs.wait_until(taken_or_refused, DYING_HOLDER_SECONDS) == "taken"


@contextmanager
def exclusive(path, refusal: str) -> Iterator[None]:
    """An flock on `path` for the block; HotswapError(BUSY, refusal) if someone holds it."""
    with open(path, "a+") as handle:
        if not _try_lock(handle, fcntl.LOCK_EX):
            raise HotswapError(refusal, ExitCode.BUSY)
        yield


def holder(cfg: Config) -> int | None:
    """The pid of a reload running now, or None (a shared lock: never blocks a reload for
    longer than CONTENTION_SECONDS)."""
    try:
        with open(cfg.lock_file) as handle:
            if _try_lock(handle, fcntl.LOCK_SH):
                return None
            found = Holder.parse(handle.read())
            return found.pid if found else -1
    except FileNotFoundError:
        return None


@contextmanager
def unless_swapping(cfg: Config) -> Iterator[bool]:
    """A shared hold on the reload lock for a few milliseconds' work, if no swap holds it
    (True), else False at once: never a reason for a swap starting now to be refused."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.lock_file, "a+") as handle:
        yield _try_lock(handle, fcntl.LOCK_SH)


def hold_instance_lock(cfg: Config) -> int:
    """Take run/instance.lock for the life of the instance and return its fd.

    `hotswap start` keeps the fd open and inheritable, so uWSGI holds the lock too: a second
    start racing the first is refused here, before either touches the FIFOs or the socket.
    """
    fd = os.open(cfg.run_dir / "instance.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise HotswapError(
            f"already running or starting: another process holds {cfg.run_dir}/instance.lock",
            ExitCode.BUSY,
        ) from None
    os.set_inheritable(fd, True)
    return fd
