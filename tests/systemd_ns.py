"""A real systemd, PID 1 of its own namespaces, for tests of deploy/hotswap.service.

    with NamespaceSystemd(unit_dir) as sd:      # boots it, stops it (by pid) on exit
        sd.systemctl("start", "hotswap.service")
        sd.show("hotswap.service", "MainPID")

What runs: ``unshare --pid --fork --mount --mount-proc --cgroup --uts --ipc
--propagation private`` starts a small shell as PID 1 of the new namespaces, which mounts a
few private file systems and then execs ``/lib/systemd/systemd --system --unit=T.target``.
``nsenter -t <pid> -m -p systemctl ...`` talks to it.

Containment (the nested manager is root on the real machine, so this is not optional):

* ``SYSTEMD_UNIT_PATH`` is the test's unit folder ONLY (no trailing ':'): with the distro
  unit folders, DefaultDependencies pull in sysinit.target, whose systemd-tmpfiles-setup
  empties the real /tmp (``D /tmp``), and systemd-sysctl writes host sysctls. Stub targets
  (sysinit, basic, shutdown, ...) stand in for them here.
* ``container=hotswap-test`` makes systemd behave as in a container: no kernel module
  loading, and its final systemd-shutdown just exits instead of unmounting and remounting
  file systems read-only (a read-only remount would hit the shared superblock of /).
* /run, /tmp, /var/tmp, /var/log and /var/lib/systemd are fresh tmpfs in the private mount
  namespace, so RuntimeDirectory=, LogsDirectory=, PrivateTmp= and the (volatile) journal
  never touch the real ones; /dev/console is bind-mounted to a log file.
* The manager gets its own cgroup: a cgroup2 directory created for it, made the root of its
  cgroup namespace, and a cgroup2 file system mounted at /sys/fs/cgroup inside (so systemd
  runs in unified mode even on a hybrid host). Stopping checks that the subtree holds no
  process and removes it.
* UTS and IPC namespaces are private too (systemd sets the hostname at boot).
Left unavoidable: PID 1 bumps fs.file-max and net.unix.max_dgram_qlen (raises limits only).

Stopping is by pid: SIGRTMIN+4 (poweroff.target, stubbed to stop every unit and exit), then
SIGRTMIN+14 (immediate), then SIGKILL of the namespace's PID 1 (the kernel kills the rest).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hotswap.system.procs import wait_until

SYSTEMD = "/lib/systemd/systemd"
T = TypeVar("T")


class HarnessError(RuntimeError):
    pass


def wait_for(
    predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05
) -> T:
    """hotswap's wait_until, raising a TimeoutError that names `what` (and the last error
    the predicate raised) instead of returning None."""
    errors: list[BaseException] = []

    def attempt() -> T | None:
        try:
            return predicate()
        except Exception as exc:  # noqa: BLE001 - the last error is reported on timeout
            errors[:] = [exc]
            return None

    value = wait_until(attempt, timeout, interval)
    if not value:
        detail = f" (last error: {errors[0]!r})" if errors else ""
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
    return value


def user_exists(name: str) -> bool:
    """Whether the system account exists (a test that creates one removes it afterwards)."""
    return subprocess.run(["getent", "passwd", name], capture_output=True).returncode == 0


def unavailable_reason() -> str | None:
    """Why this machine cannot run a namespaced systemd, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (a system manager in its own namespaces)"
    for tool in ("unshare", "nsenter", "systemctl", "systemd-analyze"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.access(SYSTEMD, os.X_OK):
        return f"{SYSTEMD} is not installed"
    if _cgroup2_mount() is None:
        return "no cgroup2 file system mounted on this machine"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount", "--cgroup", "--uts", "--ipc", "true"],
        capture_output=True, text=True, timeout=30,
    )
    if probe.returncode != 0:
        return f"unshare cannot create namespaces here: {probe.stderr.strip()}"
    return None


def _cgroup2_mount() -> str | None:
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup2":
                return fields[4]
    return None


def _own_cgroup2_path() -> str:
    with open("/proc/self/cgroup") as cgroups:
        for line in cgroups:
            if line.startswith("0::"):
                return line[3:].strip()
    return "/"


def _remove_cgroup_tree(root: Path) -> None:
    """rmdir a cgroup and its children, deepest first (fails if a process is left in it)."""
    for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda e: -e[0].count("/")):
        os.rmdir(dirpath)


def _remove_stale_cgroups(parent: Path) -> None:
    """Remove empty hotswap-nssd-* trees that an interrupted earlier run left behind."""
    for stale in parent.glob("hotswap-nssd-*"):
        try:
            _remove_cgroup_tree(stale)
        except OSError:
            pass  # still in use (another run) or not empty: leave it alone


# Stand-ins for the distro units that services reference through DefaultDependencies, and
# the shutdown path. None of them runs anything on the host.
STUB_UNITS = {
    "T.target": """\
[Unit]
Description=Test boot target
DefaultDependencies=no
Wants=systemd-journald.socket
""",
    "sysinit.target": "[Unit]\nDescription=stub sysinit\nDefaultDependencies=no\n",
    "basic.target": "[Unit]\nDescription=stub basic\nDefaultDependencies=no\n",
    "sockets.target": "[Unit]\nDescription=stub sockets\nDefaultDependencies=no\n",
    "paths.target": "[Unit]\nDescription=stub paths\nDefaultDependencies=no\n",
    "timers.target": "[Unit]\nDescription=stub timers\nDefaultDependencies=no\n",
    "slices.target": "[Unit]\nDescription=stub slices\nDefaultDependencies=no\n",
    "local-fs.target": "[Unit]\nDescription=stub local-fs\nDefaultDependencies=no\n",
    "network.target": "[Unit]\nDescription=stub network\nDefaultDependencies=no\n",
    "network-online.target": "[Unit]\nDescription=stub network-online\nDefaultDependencies=no\n",
    "multi-user.target": "[Unit]\nDescription=stub multi-user\nDefaultDependencies=no\n",
    "shutdown.target": "[Unit]\nDescription=stub shutdown\nDefaultDependencies=no\n"
    "RefuseManualStart=yes\n",
    "umount.target": "[Unit]\nDescription=stub umount\nDefaultDependencies=no\n"
    "RefuseManualStart=yes\n",
    "final.target": "[Unit]\nDescription=stub final\nDefaultDependencies=no\n"
    "RefuseManualStart=yes\nAfter=shutdown.target umount.target\n",
    # SIGRTMIN+4 starts poweroff.target; in a container poweroff-force just exits the manager.
    "poweroff.target": """\
[Unit]
Description=Power off (exit the test manager)
DefaultDependencies=no
Requires=systemd-poweroff.service
After=systemd-poweroff.service
AllowIsolate=yes
""",
    "systemd-poweroff.service": """\
[Unit]
Description=Power off (exit the test manager)
DefaultDependencies=no
Requires=shutdown.target umount.target final.target
After=shutdown.target umount.target final.target
SuccessAction=poweroff-force
""",
    "exit.target": """\
[Unit]
Description=Exit the test manager
DefaultDependencies=no
Requires=systemd-poweroff.service
After=systemd-poweroff.service
""",
    # A volatile journal (in the private /run) so `journalctl -u` works; no /dev/log
    # symlink and no audit socket (those would touch the host's /dev and audit settings).
    "systemd-journald.socket": """\
[Unit]
Description=Journal Socket
DefaultDependencies=no
Before=sockets.target
[Socket]
ListenDatagram=/run/systemd/journal/socket
ListenStream=/run/systemd/journal/stdout
PassCredentials=yes
PassSecurity=yes
ReceiveBuffer=8M
Service=systemd-journald.service
SocketMode=0666
Timestamping=us
""",
    "systemd-journald.service": """\
[Unit]
Description=Journal Service
DefaultDependencies=no
Requires=systemd-journald.socket
After=systemd-journald.socket
[Service]
Type=notify
ExecStart=/lib/systemd/systemd-journald
Sockets=systemd-journald.socket
FileDescriptorStoreMax=4224
RuntimeDirectory=systemd/journal
RuntimeDirectoryPreserve=yes
StandardOutput=null
# journald logs about itself to /dev/kmsg by default: keep the host's kernel log clean
Environment=SYSTEMD_LOG_TARGET=null
Restart=always
RestartSec=0
""",
}

# Runs as PID 1 of the new namespaces, then becomes systemd. $1 unit dir, $2 console log.
_WRAPPER = r"""
set -eu
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup
for dir in /run /tmp /var/tmp /var/log /var/lib/systemd; do
    mkdir -p "$dir"
    mode=0755
    case "$dir" in /tmp|/var/tmp) mode=1777 ;; esac
    mount -t tmpfs -o "mode=$mode,nosuid,nodev" tmpfs "$dir"
done
mount --bind "$2" /dev/console
export container=hotswap-test SYSTEMD_UNIT_PATH="$1"
exec /lib/systemd/systemd --system --unit=T.target --log-target=journal \
    --log-level=info --show-status=no </dev/null >>"$2" 2>&1
"""


class NamespaceSystemd:
    """One systemd instance in fresh pid/mount/cgroup/uts/ipc namespaces."""

    def __init__(self, unit_dir: Path | str, state_dir: Path | str | None = None) -> None:
        self.unit_dir = Path(unit_dir)
        self.state_dir = Path(state_dir) if state_dir else self.unit_dir.parent
        self.console_log = self.state_dir / "systemd-console.log"
        self.token = uuid.uuid4().hex[:10]
        self.cgroup_dir: Path | None = None
        self.launcher: subprocess.Popen | None = None
        self.pid: int | None = None  # systemd, as seen from the host
        self.boot_seconds: float | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def write_stub_units(self) -> None:
        self.unit_dir.mkdir(parents=True, exist_ok=True)
        for name, text in STUB_UNITS.items():
            (self.unit_dir / name).write_text(text)

    def start(self, timeout: float = 30.0) -> NamespaceSystemd:
        reason = unavailable_reason()
        if reason:
            raise HarnessError(reason)
        self.write_stub_units()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.console_log.write_text("")
        mount = _cgroup2_mount()
        assert mount is not None
        parent = Path(mount + _own_cgroup2_path())
        _remove_stale_cgroups(parent)
        self.cgroup_dir = parent / f"hotswap-nssd-{self.token}"
        self.cgroup_dir.mkdir()
        started = time.monotonic()
        # The launcher moves itself into the new cgroup, so the cgroup namespace created by
        # unshare is rooted there; setsid detaches it from the test's terminal and signals.
        console = open(self.console_log, "ab")  # noqa: SIM115 - closed below
        try:
            self.launcher = self._spawn(console)
        except BaseException:
            _remove_cgroup_tree(self.cgroup_dir)
            self.cgroup_dir = None
            raise
        finally:
            console.close()
        try:
            self.pid = wait_for(self._find_pid1, timeout, "the namespace's PID 1")
            wait_for(self._is_running, timeout, "systemd to finish booting", interval=0.1)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - started
        return self

    def _spawn(self, console) -> subprocess.Popen:
        assert self.cgroup_dir is not None
        return subprocess.Popen(
            [
                "sh", "-c",
                'echo $$ > "$0/cgroup.procs" && exec "$@"',
                str(self.cgroup_dir),
                "unshare", "--pid", "--fork", "--mount", "--mount-proc", "--cgroup",
                "--uts", "--ipc", "--propagation", "private",
                "sh", "-c", _WRAPPER, "pid1", str(self.unit_dir), str(self.console_log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _find_pid1(self) -> int | None:
        assert self.launcher is not None
        if self.launcher.poll() is not None:
            raise HarnessError(
                f"unshare exited with {self.launcher.returncode}: {self.console_text()}"
            )
        children = Path(f"/proc/{self.launcher.pid}/task/{self.launcher.pid}/children")
        pids = [int(p) for p in children.read_text().split()]
        if not pids:
            return None
        exe = os.readlink(f"/proc/{pids[0]}/exe")
        return pids[0] if exe.endswith("/systemd") else None

    def _is_running(self) -> bool:
        state = self.systemctl("is-system-running", check=False).stdout.strip()
        if state in ("running", "degraded"):
            return True
        if self.launcher is not None and self.launcher.poll() is not None:
            raise HarnessError(f"systemd exited while booting: {self.console_text()}")
        return False

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the manager by its pid, make sure nothing of it is left, remove its cgroup."""
        if self.launcher is not None and self.launcher.poll() is None:
            steps = []
            if self.pid is not None:
                steps = [
                    (self.pid, signal.SIGRTMIN + 4, timeout),  # poweroff.target: stop units
                    (self.pid, signal.SIGRTMIN + 14, 15.0),  # immediate poweroff
                    (self.pid, signal.SIGKILL, 15.0),  # the kernel kills the whole namespace
                ]
            steps.append((self.launcher.pid, signal.SIGKILL, 15.0))
            for pid, sig, wait in steps:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    self.launcher.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.launcher is not None:
            self.launcher.wait(timeout=15)
        if self.cgroup_dir is not None and self.cgroup_dir.exists():
            wait_for(lambda: not self.cgroup_pids(), 15.0, "the manager's cgroup to empty")
            _remove_cgroup_tree(self.cgroup_dir)
            self.cgroup_dir = None

    def __enter__(self) -> NamespaceSystemd:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- talking to it -----------------------------------------------------------------

    def nsenter(
        self, *argv: str, check: bool = True, timeout: float = 120.0, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        """Run argv inside the manager's mount and pid namespaces."""
        if self.pid is None:
            raise HarnessError("systemd is not running")
        full_env = dict(os.environ, SYSTEMD_PAGER="", SYSTEMD_COLORS="0", LC_ALL="C.UTF-8")
        full_env.pop("NOTIFY_SOCKET", None)
        if env:
            full_env.update(env)
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", "--", *argv],
            capture_output=True, text=True, timeout=timeout, env=full_env,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise HarnessError(
                f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def systemctl(self, *args: str, check: bool = True, timeout: float = 120.0):
        return self.nsenter("systemctl", "--no-pager", "--no-ask-password", *args,
                            check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        return {p: values.get(p, "") for p in props}

    def journal(self, unit: str | None = None, lines: int = 200) -> str:
        args = ["journalctl", "--no-pager", "-o", "short-monotonic", "-n", str(lines)]
        if unit:
            args += ["-u", unit]
        result = self.nsenter(*args, check=False)
        return result.stdout + result.stderr

    def host_path(self, path: str) -> str:
        """The path of a file inside the manager's mount namespace, usable from the host."""
        return f"/proc/{self.pid}/root{path}"

    def console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def cgroup_pids(self, relative: str = "") -> list[int]:
        """Host pids of every process in the manager's cgroup subtree (or one unit's)."""
        if self.cgroup_dir is None:
            return []
        root = self.cgroup_dir / relative.lstrip("/")
        pids: list[int] = []
        for dirpath, _dirs, files in os.walk(root):
            if "cgroup.procs" in files:
                try:
                    text = Path(dirpath, "cgroup.procs").read_text()
                except OSError:
                    continue
                pids += [int(p) for p in text.split()]
        return pids

    def unit_pids(self, unit: str) -> list[int]:
        """Host pids in the unit's control group (empty when the unit has none)."""
        group = self.show(unit, "ControlGroup")["ControlGroup"]
        return self.cgroup_pids(group) if group else []

    def ns_pid_of(self, host_pid: int) -> int:
        """Translate a host pid into the manager's pid namespace."""
        with open(f"/proc/{host_pid}/status") as status:
            for line in status:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
        raise HarnessError(f"no NSpid for {host_pid}")
