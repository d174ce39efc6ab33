#!/bin/sh
# Health check with curl over the unix socket; exit codes like `hotswap probe`:
#   0 OK (HTTP 200), 1 unexpected status, 2 no answer (socket missing, refused, timeout),
#   3 unknown (bad usage, curl missing).
# usage: check-curl.sh [SOCKET] [PATH] [TIMEOUT_SECONDS]
SOCKET=${1:-run/http.sock}
URLPATH=${2:-/healthz}
TIMEOUT=${3:-5}
command -v curl >/dev/null 2>&1 || { echo "UNKNOWN - curl is not installed" >&2; exit 3; }
case "$URLPATH" in /*) ;; *) echo "UNKNOWN - path must start with /: $URLPATH" >&2; exit 3;; esac
if [ ! -S "$SOCKET" ]; then echo "CRITICAL - no socket at $SOCKET" >&2; exit 2; fi
body=$(mktemp) || exit 3
trap 'rm -f "$body"' EXIT
status=$(curl --silent --show-error --max-time "$TIMEOUT" --unix-socket "$SOCKET" \
  --output "$body" --write-out '%{http_code}' "http://hotswap$URLPATH") || {
  echo "CRITICAL - GET $URLPATH on $SOCKET: no answer" >&2; exit 2; }
if [ "$status" = "200" ]; then
  echo "OK - GET $URLPATH -> 200: $(head -c 300 "$body")"
  exit 0
fi
echo "WARNING - GET $URLPATH -> $status: $(head -c 300 "$body")" >&2
exit 1
