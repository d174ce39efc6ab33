#!/usr/bin/env bash
# `make reload|status|stop|recover`: run the CLI, and when it fails say its own exit code and
# what it means. make reports every failing recipe as make's exit 2 (GNU make exits only 0,
# 1 or 2), so scripts and monitoring call .venv/bin/hotswap directly to get the code.
#
#   scripts/make-cli.sh BIN_DIR COMMAND [ARGS...]
BIN=$1
shift
"$BIN/hotswap" --ini srv.ini "$@"
code=$?
if [ "$code" -ne 0 ]; then
    meaning=$("$BIN/hotswap" --help | sed -n "s/^ *$code  //p" | head -n 1)
    echo "make: \`hotswap $*\` exited $code: ${meaning:-see hotswap --help}." \
         "make exits 2 on any failure; for the code itself run $BIN/hotswap $*" >&2
fi
exit "$code"
