"""The app's own checks against a new store, in a child, before any worker sees it.

A reload imports the app in a new master: the app validates its store and runs its smoke
requests (hotswap/inside/wsgi.py), and a release that fails them never serves. A refresh keeps
the processes, so it runs the same import here, in a child process, with the store it is
about to serve:

- the environment of the live master (/proc/PID/environ: what `hotswap start` gave it, e.g.
  SRV_MODE), the ini's folder (`chdir`) as the working directory;
- HOTSWAP_CHECK_STORE = the new store (inside/live_store.py opens it instead of the pointer);
- HOTSWAP_INI_OPTIONS = the ini's smoke and health keys, which wsgi.ini_option() reads
  outside uWSGI.

The child prints nothing on success, or the cause in one line on stderr (exit 1). A store
bad enough to crash the import kills the child, not the CLI.

    python -m hotswap.releases.app_check   # with the environment above
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..config import Config, read_keys
from ..errors import ExitCode, HotswapError
from ..inside.live_store import CHECK_STORE_ENV
from ..inside.wsgi import APP_KEY, HEALTH_PATH_KEY, INI_OPTIONS_ENV, SMOKE_KEY
from ..system import procs

TARGET_ENV = "HOTSWAP_CHECK_TARGET"  # "file:PATH" (wsgi-file) or "app:SPEC" (hotswap-app)
INI_KEYS = ("chdir", "wsgi-file", APP_KEY, SMOKE_KEY, HEALTH_PATH_KEY)


def master_environment(master: int | None) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{master}/environ").read_bytes() if master else b""
    except OSError:
        raw = b""
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    found = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}
    return found or dict(os.environ)


def run_child(args: list[str], timeout: float, stop: Callable[[], bool], what: str,
              **popen: object) -> subprocess.CompletedProcess:
    """Run a check in a child, killed (and HotswapError) past `timeout` or once `stop()`
    says the refresh was interrupted: a hung import must not hold the CLI."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(args, stdout=out, stderr=err, text=True, **popen)
        try:
            ended = procs.wait_until(lambda: stop() or child.poll() is not None, timeout,
                                     interval=0.01)
            if child.poll() is None:
                cause = "interrupted" if ended else f"took over {timeout:g}s"
                raise HotswapError(f"{what} {cause}; stopped it", ExitCode.RELOAD_FAILED
                                   if ended else ExitCode.TIMEOUT)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(args, child.returncode, out.read(), err.read())


def check_app(cfg: Config, store_path: str, master: int | None, timeout: float,
              stop: Callable[[], bool]) -> None:
    """HotswapError(RELOAD_FAILED) with the app's own cause unless its import passes."""
    values = read_keys(cfg, list(INI_KEYS))
    if values.get("wsgi-file"):
        target = f"file:{values['wsgi-file']}"
    elif values.get(APP_KEY):
        target = f"app:{values[APP_KEY]}"
    else:
        return  # an app the kit does not know how to import: the store checks must do
    env = {**master_environment(master), CHECK_STORE_ENV: store_path, TARGET_ENV: target,
           INI_OPTIONS_ENV: json.dumps({k: v for k, v in values.items() if v})}
    env.pop("NOTIFY_SOCKET", None)
    done = run_child([sys.executable, "-m", "hotswap.releases.app_check"], timeout, stop,
                     what=f"the app's check of {store_path}", env=env,
                     cwd=values.get("chdir") or cfg.ini.parent)
    if done.returncode == 0:
        return
    if done.returncode < 0:
        cause = f"the app check died of signal {-done.returncode}"
    else:
        cause = (done.stderr.strip().splitlines() or ["no detail"])[-1]
    raise HotswapError(f"store refused by the app's checks: {cause}", ExitCode.RELOAD_FAILED)


def main() -> int:
    kind, _, where = os.environ.get(TARGET_ENV, "").partition(":")
    try:
        if kind == "file":
            sys.path.insert(0, os.path.dirname(os.path.abspath(where)))
            runpy.run_path(where, run_name="hotswap_app_check")
        elif kind == "app":
            # what `module = hotswap.inside.entry` imports in uWSGI: it reads hotswap-app
            importlib.import_module("hotswap.inside.entry")
        else:
            print(f"{TARGET_ENV} must be file:PATH or app:SPEC", file=sys.stderr)
            return 2
    except BaseException as exc:  # noqa: BLE001 - whatever the import raises is the cause
        if isinstance(exc, SystemExit) and not exc.code:
            return 0
        print(f"{type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
