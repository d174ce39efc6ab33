#!/usr/bin/env bash
# What `make venv` (and deploy/install-systemd.sh) needs before it builds anything: one line
# per missing prerequisite, with the Debian package that provides it, then exit 1.
#
#   scripts/check-prereqs.sh [PYTHON] [WHEEL_DIR]     (defaults: python3, .wheels)
#
# A C compiler and the Python headers are needed only to compile uWSGI, which has no wheel
# on PyPI; once a uWSGI wheel for this Python is in WHEEL_DIR, neither is checked.
set -uo pipefail
PYTHON=${1:-python3}
WHEELS=${2:-.wheels}
missing=()

if [ "$(uname -s)" != Linux ]; then
    missing+=("Linux: this is $(uname -s); hotswap reads /proc and uses prctl(PR_SET_CHILD_SUBREAPER)")
fi
# One call to the interpreter: its version, whether venv + ensurepip work, where Python.h is.
facts=$("$PYTHON" -c '
import importlib.util as u, os, sys, sysconfig
print("version", "%d.%d.%d" % sys.version_info[:3])
print("modern", int(sys.version_info >= (3, 11)))
print("venv", int(all(u.find_spec(m) for m in ("venv", "ensurepip"))))
print("headers", int(os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))))
print("tag", "cp%d%d" % sys.version_info[:2])
' 2>/dev/null)
if [ -z "$facts" ]; then
    missing+=("Python: no working interpreter at '$PYTHON' (apt-get install python3, or make PYTHON=/path/to/python3.11)")
else
    fact() { awk -v k="$1" '$1 == k { print $2 }' <<<"$facts"; }
    if [ "$(fact modern)" != 1 ]; then
        missing+=("Python >= 3.11: $PYTHON is $(fact version) (make PYTHON=/path/to/python3.11 ...)")
    fi
    if [ "$(fact venv)" != 1 ]; then
        missing+=("the venv module (with ensurepip) for $PYTHON: apt-get install python3-venv")
    fi
    if ! ls "$WHEELS"/[uU][wW][sS][gG][iI]-*-"$(fact tag)"-*.whl >/dev/null 2>&1; then
        if ! command -v "${CC:-cc}" >/dev/null 2>&1; then
            missing+=("a C compiler (${CC:-cc}), to compile uWSGI once: apt-get install gcc")
        fi
        if [ "$(fact headers)" != 1 ]; then
            missing+=("the Python headers (Python.h) for $PYTHON, to compile uWSGI once: apt-get install python3-dev")
        fi
    fi
fi

for line in "${missing[@]}"; do
    echo "prerequisite missing: $line" >&2
done
[ ${#missing[@]} -eq 0 ]
