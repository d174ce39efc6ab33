#!/bin/sh
# Health check with socat over the unix socket (for hosts without curl); exit codes like
# `hotswap probe`: 0 OK (HTTP 200), 1 unexpected status, 2 no answer, 3 unknown.
# usage: check-socat.sh [SOCKET] [PATH] [TIMEOUT_SECONDS]
SOCKET=${1:-run/http.sock}
URLPATH=${2:-/healthz}
TIMEOUT=${3:-5}
command -v socat >/dev/null 2>&1 || { echo "UNKNOWN - socat is not installed" >&2; exit 3; }
case "$URLPATH" in /*) ;; *) echo "UNKNOWN - path must start with /: $URLPATH" >&2; exit 3;; esac
if [ ! -S "$SOCKET" ]; then echo "CRITICAL - no socket at $SOCKET" >&2; exit 2; fi
answer=$(printf 'GET %s HTTP/1.0\r\nHost: hotswap\r\n\r\n' "$URLPATH" |
  socat -T "$TIMEOUT" - "UNIX-CONNECT:$SOCKET" 2>/dev/null)
status=$(printf '%s\n' "$answer" | head -n 1 | cut -d' ' -f2)
case "$status" in
  200) echo "OK - GET $URLPATH -> 200: $(printf '%s' "$answer" | tail -n 1 | head -c 300)"; exit 0;;
  "") echo "CRITICAL - GET $URLPATH on $SOCKET: no answer" >&2; exit 2;;
  *) echo "WARNING - GET $URLPATH -> $status" >&2; exit 1;;
esac
