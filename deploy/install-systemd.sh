#!/usr/bin/env bash
# Install hotswap as a systemd service.
#
#   deploy/install-systemd.sh [--socket | --socket-tcp HOST:PORT] PREFIX [UNIT_DIR]
#                                                   (as root; `make install-systemd PREFIX=...`)
#
#   --socket       also install deploy/hotswap.socket (systemd holds /run/hotswap/http.sock,
#                  so a restart refuses nothing) and its drop-in hotswap.service.d/socket.conf;
#                  srv.ini gets `protocol = http` (uWSGI's protocol for an adopted socket)
#   --socket-tcp A the same on a TCP address (srv.ini's http-socket becomes A)
#
#   PREFIX/app     srv.py, srv.ini (run_dir/log_dir -> /run/hotswap, /var/log/hotswap), scripts/,
#                  data/ (copied from the repo when it has one), owned by root, read-only to
#                  the service
#   PREFIX/venv    a venv of the SYSTEM python with uWSGI, Flask, click and hotswap
#   UNIT_DIR/hotswap.service  deploy/hotswap.service with PREFIX and the user filled in
#                  (UNIT_DIR defaults to /etc/systemd/system, then `systemctl daemon-reload`)
#   a system user and group `hotswap` (HOTSWAP_USER) if missing
#
# Why the system python, and why uWSGI is compiled for it: the service runs as an unprivileged
# user with ProtectHome=yes, so nothing it runs may live under /root or /home. A developer venv
# (pyenv's python under /root) and the uWSGI wheel built for it (its uwsgi binary loads
# libpython from /root/.pyenv/..., RUNPATH) are unusable there. The wheel built here is cached
# in <repo>/.wheels/system-python-<version>/ (HOTSWAP_WHEEL_CACHE), so only the first install
# compiles (about 35 s on 2 cores).
#
# PREFIX must not be under /tmp, /var/tmp, /home or /root: PrivateTmp= and ProtectHome= hide
# them from the service.
#
# Environment: HOTSWAP_USER (default hotswap), HOTSWAP_SYSTEM_PYTHON (default /usr/bin/python3),
# HOTSWAP_WHEEL_CACHE, HOTSWAP_NO_DAEMON_RELOAD=1 (skip `systemctl daemon-reload`).
set -euo pipefail

die() { echo "install-systemd: $*" >&2; exit 1; }
say() { echo "install-systemd: $*"; }

SOCKET_UNIT=""
case "${1:-}" in
    --socket) SOCKET_UNIT=/run/hotswap/http.sock; shift ;;
    --socket-tcp) [ $# -ge 2 ] || die "--socket-tcp needs HOST:PORT"; SOCKET_UNIT=$2; shift 2 ;;
esac
[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: $0 [--socket | --socket-tcp HOST:PORT] PREFIX [UNIT_DIR]"
[ "$(id -u)" -eq 0 ] || die "must run as root (it creates a system user and installs a unit)"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=$(realpath -m "$1")
UNIT_DIR=$(realpath -m "${2:-/etc/systemd/system}")
SERVICE_USER=${HOTSWAP_USER:-hotswap}
SYSTEM_PYTHON=${HOTSWAP_SYSTEM_PYTHON:-/usr/bin/python3}
RUN_DIR=/run/hotswap      # RuntimeDirectory=hotswap
LOG_DIR=/var/log/hotswap  # LogsDirectory=hotswap

case "$PREFIX/" in
    /tmp/*|/var/tmp/*|/home/*|/root/*)
        die "PREFIX $PREFIX is hidden from the service (PrivateTmp=/ProtectHome=); use e.g. /opt/hotswap" ;;
    /) die "PREFIX must not be /" ;;
esac
case "$SYSTEM_PYTHON" in
    /root/*|/home/*) die "HOTSWAP_SYSTEM_PYTHON $SYSTEM_PYTHON is hidden from the service (ProtectHome=)" ;;
esac
[ -x "$SYSTEM_PYTHON" ] || die "no python at $SYSTEM_PYTHON (apt-get install python3 python3-venv)"
"$SYSTEM_PYTHON" -c 'import sys, venv; assert sys.version_info >= (3, 11)' 2>/dev/null \
    || die "$SYSTEM_PYTHON must be Python >= 3.11 with the venv module (apt-get install python3-venv)"
# a compiler and Python.h, unless a uWSGI wheel for this python is cached (see step 3)
sys_version=$("$SYSTEM_PYTHON" -c 'import platform; print(platform.python_version())')
bash "$REPO/scripts/check-prereqs.sh" "$SYSTEM_PYTHON" \
    "${HOTSWAP_WHEEL_CACHE:-$REPO/.wheels/system-python-$sys_version}" \
    || die "install what is missing above (as root: bash scripts/install-system-deps.sh)"
for f in srv.py srv.ini pyproject.toml hotswap/cli.py deploy/hotswap.service; do
    [ -e "$REPO/$f" ] || die "$REPO/$f is missing: run this from a hotswap checkout"
done

# -- 1. the service account --------------------------------------------------------------------
if ! getent passwd "$SERVICE_USER" >/dev/null; then
    useradd --system --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin --comment "hotswap web service" "$SERVICE_USER"
    say "created system user $SERVICE_USER"
fi

# -- 2. the application: code, config, data (root-owned, world-readable, not writable) --------
install -d -m 0755 "$PREFIX" "$PREFIX/app" "$PREFIX/app/data"
install -m 0644 "$REPO/srv.py" "$PREFIX/app/srv.py"
rm -rf "$PREFIX/app/scripts"
cp -r "$REPO/scripts" "$PREFIX/app/scripts"
find "$PREFIX/app/scripts" -name __pycache__ -prune -exec rm -rf {} +
if [ -d "$REPO/data" ]; then
    cp -r "$REPO/data/." "$PREFIX/app/data/"
fi
ini_tmp=$(mktemp "$PREFIX/app/.srv.ini.XXXXXX")
sed -e "s|^run_dir[[:space:]]*=.*|run_dir = $RUN_DIR|" \
    -e "s|^log_dir[[:space:]]*=.*|log_dir = $LOG_DIR|" "$REPO/srv.ini" >"$ini_tmp"
grep -qx "run_dir = $RUN_DIR" "$ini_tmp" && grep -qx "log_dir = $LOG_DIR" "$ini_tmp" \
    || { rm -f "$ini_tmp"; die "srv.ini has no 'run_dir =' / 'log_dir =' lines to rewrite"; }
if [ -n "$SOCKET_UNIT" ]; then
    # an adopted socket speaks the ini's `protocol` (deploy/hotswap.socket says why)
    sed -i -e "s|^http-socket[[:space:]]*=.*|http-socket = $SOCKET_UNIT\nprotocol = http|" "$ini_tmp"
fi
chmod 0644 "$ini_tmp"
mv "$ini_tmp" "$PREFIX/app/srv.ini"
chown -R root:root "$PREFIX/app"
chmod -R u+rwX,go+rX,go-w "$PREFIX/app"
[ -e "$PREFIX/app/data/terms.tsv" ] || say "WARNING: no $PREFIX/app/data/terms.tsv yet; make one with
    $PREFIX/venv/bin/python $PREFIX/app/scripts/gen_resource.py --terms N --version V -o $PREFIX/app/data/terms.tsv"

# -- 3. the venv, with uWSGI compiled against this python ------------------------------------
if [ ! -x "$PREFIX/venv/bin/python" ]; then
    "$SYSTEM_PYTHON" -m venv "$PREFIX/venv"
fi
VPY="$PREFIX/venv/bin/python"
PYVERSION=$("$VPY" -c 'import platform; print(platform.python_version())')
UWSGI_SPEC=$("$VPY" - "$REPO/pyproject.toml" <<'EOF'
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print(next(d for d in deps if d.lower().startswith("uwsgi")))
EOF
)
WHEEL_CACHE=${HOTSWAP_WHEEL_CACHE:-$REPO/.wheels/system-python-$PYVERSION}
mkdir -p "$WHEEL_CACHE"
# one compile at a time: two installs at once (two test files, two operators) share the cache
exec 9>"$WHEEL_CACHE/.lock"
flock 9
wheel=$(ls "$WHEEL_CACHE"/[uU][wW][sS][gG][iI]-*.whl 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$wheel" ]; then
    say "compiling $UWSGI_SPEC for $SYSTEM_PYTHON ($PYVERSION) into $WHEEL_CACHE"
    "$VPY" -m pip install --quiet --disable-pip-version-check wheel
    # --no-cache-dir: pip's own wheel cache is keyed by "cp311" only and could hand back a
    # wheel built for another 3.11 (e.g. pyenv's, linked to its libpython under /root).
    "$VPY" -m pip wheel --quiet --disable-pip-version-check --no-cache-dir --no-deps \
        --no-binary uWSGI -w "$WHEEL_CACHE" "$UWSGI_SPEC"
    wheel=$(ls "$WHEEL_CACHE"/[uU][wW][sS][gG][iI]-*.whl | sort -V | tail -n 1)
fi
flock -u 9
"$VPY" -m pip install --quiet --disable-pip-version-check "$wheel"

# Install the hotswap package from a staged copy: an in-tree build would leave build/ and
# *.egg-info in the checkout.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp -r "$REPO/pyproject.toml" "$REPO/hotswap" "$stage/"
[ -e "$REPO/README.md" ] && cp "$REPO/README.md" "$stage/"
find "$stage" -name __pycache__ -prune -exec rm -rf {} +
# the metrics extra (prometheus_client): what `hotswap-metrics = PATH` in the ini needs
"$VPY" -m pip install --quiet --disable-pip-version-check "$stage[metrics]"
chmod -R go+rX,go-w "$PREFIX/venv"

# -- 4. check it works for the service user, as the unit will run it --------------------------
cd /
if ldd "$PREFIX/venv/bin/uwsgi" | grep -Eq 'not found|=> /(root|home)/'; then
    ldd "$PREFIX/venv/bin/uwsgi" >&2
    die "$PREFIX/venv/bin/uwsgi loads libraries the service cannot reach (remove $wheel and retry)"
fi
runuser -u "$SERVICE_USER" -- "$PREFIX/venv/bin/uwsgi" --version >/dev/null \
    || die "the service user cannot run $PREFIX/venv/bin/uwsgi"
runuser -u "$SERVICE_USER" -- "$PREFIX/venv/bin/hotswap" --help >/dev/null \
    || die "the service user cannot run $PREFIX/venv/bin/hotswap"

# -- 5. the unit --------------------------------------------------------------------------------
install -d -m 0755 "$UNIT_DIR"
unit_tmp=$(mktemp "$UNIT_DIR/.hotswap.service.XXXXXX")
sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@USER@|$SERVICE_USER|g" \
    "$REPO/deploy/hotswap.service" >"$unit_tmp"
chmod 0644 "$unit_tmp"
mv "$unit_tmp" "$UNIT_DIR/hotswap.service"
if [ -n "$SOCKET_UNIT" ]; then
    sock_tmp=$(mktemp "$UNIT_DIR/.hotswap.socket.XXXXXX")
    sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@USER@|$SERVICE_USER|g" \
        -e "s|^ListenStream=.*|ListenStream=$SOCKET_UNIT|" "$REPO/deploy/hotswap.socket" >"$sock_tmp"
    chmod 0644 "$sock_tmp"
    mv "$sock_tmp" "$UNIT_DIR/hotswap.socket"
    install -d -m 0755 "$UNIT_DIR/hotswap.service.d"
    install -m 0644 "$REPO/deploy/hotswap-socket.conf" "$UNIT_DIR/hotswap.service.d/socket.conf"
    say "installed $UNIT_DIR/hotswap.socket on $SOCKET_UNIT (systemctl enable --now hotswap.socket)"
fi
say "installed $UNIT_DIR/hotswap.service (app $PREFIX/app, venv $PREFIX/venv, user $SERVICE_USER)"

if [ "$UNIT_DIR" = /etc/systemd/system ] && [ "$(cat /proc/1/comm)" = systemd ] \
        && [ "${HOTSWAP_NO_DAEMON_RELOAD:-0}" != 1 ]; then
    systemctl daemon-reload
    say "next: systemctl enable --now hotswap; a release = new files in $PREFIX/app, then systemctl reload hotswap"
fi
