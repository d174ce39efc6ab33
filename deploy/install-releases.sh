#!/usr/bin/env bash
# Turn an installed hotswap service into a release layout, with the release watcher.
#
#   deploy/install-releases.sh PREFIX [UNIT_DIR]     (as root, after deploy/install-systemd.sh)
#
#   PREFIX/site                 the layout's ROOT, owned by the service user (docs/releases.md):
#     hotswap.ini               run_dir /run/hotswap, log_dir /var/log/hotswap, then current/srv.ini
#     releases/<id>, current    the first release is a copy of PREFIX/app
#     state/, drop/             the deploy record; where releases land for the watcher
#   UNIT_DIR/hotswap.service.d/releases.conf   hotswap.service runs from PREFIX/site
#   UNIT_DIR/hotswap-watch.service             `hotswap watch PREFIX/site/drop`
#   UNIT_DIR/hotswap-current.path, hotswap-reload.service   or: reload when `current` changes
#
# Environment: HOTSWAP_USER (default hotswap), HOTSWAP_NO_DAEMON_RELOAD=1.
set -euo pipefail

die() { echo "install-releases: $*" >&2; exit 1; }
say() { echo "install-releases: $*"; }

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: $0 PREFIX [UNIT_DIR]"
[ "$(id -u)" -eq 0 ] || die "must run as root"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=$(realpath -m "$1")
UNIT_DIR=$(realpath -m "${2:-/etc/systemd/system}")
SERVICE_USER=${HOTSWAP_USER:-hotswap}
ROOT=$PREFIX/site
HOTSWAP=$PREFIX/venv/bin/hotswap
[ -x "$HOTSWAP" ] && [ -e "$PREFIX/app/srv.ini" ] && [ -e "$UNIT_DIR/hotswap.service" ] \
    || die "no hotswap service installed in $PREFIX / $UNIT_DIR: run deploy/install-systemd.sh first"
getent passwd "$SERVICE_USER" >/dev/null || die "no user $SERVICE_USER"

"$HOTSWAP" init-releases "$ROOT" --run-dir /run/hotswap --log-dir /var/log/hotswap
install -d -m 0750 "$ROOT/drop"
if [ ! -L "$ROOT/current" ]; then
    "$HOTSWAP" --ini "$ROOT/hotswap.ini" deploy "$PREFIX/app"
fi
touch "$ROOT/state/release.stamp"  # hotswap-current.path watches it (must exist to be watched)
chown -R "$SERVICE_USER:$SERVICE_USER" "$ROOT"
chmod 0750 "$ROOT"

render() {  # render TEMPLATE DEST
    local tmp
    tmp=$(mktemp "$(dirname "$2")/.render.XXXXXX")
    sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@ROOT@|$ROOT|g" -e "s|@USER@|$SERVICE_USER|g" "$1" >"$tmp"
    chmod 0644 "$tmp"
    mv "$tmp" "$2"
}
install -d -m 0755 "$UNIT_DIR/hotswap.service.d"
render "$REPO/deploy/hotswap-releases.conf" "$UNIT_DIR/hotswap.service.d/releases.conf"
render "$REPO/deploy/hotswap-watch.service" "$UNIT_DIR/hotswap-watch.service"
# the systemd-native alternative to the watcher (enable one or the other, docs/releases.md)
render "$REPO/deploy/hotswap-current.path" "$UNIT_DIR/hotswap-current.path"
render "$REPO/deploy/hotswap-reload.service" "$UNIT_DIR/hotswap-reload.service"
say "layout $ROOT (current -> $(readlink "$ROOT/current")); units in $UNIT_DIR"

if [ "$UNIT_DIR" = /etc/systemd/system ] && [ "$(cat /proc/1/comm)" = systemd ] \
        && [ "${HOTSWAP_NO_DAEMON_RELOAD:-0}" != 1 ]; then
    systemctl daemon-reload
    say "next: systemctl restart hotswap; systemctl enable --now hotswap-watch (or hotswap-current.path)"
fi
