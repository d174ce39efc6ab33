#!/usr/bin/env bash
# A smoke run of the kit on one Python: a venv of that Python (uWSGI compiled for it once, the
# wheel kept in .wheels/ like make's), then the plain app's tests from tests/test_app.py:
# start, 3 reloads under 32 clients with 0 failed requests, a broken release refused.
#   bash scripts/python-smoke.sh ~/.pyenv/versions/3.12.1/bin/python
# .ci/run runs it for each 3.12 and 3.13 that pyenv has; the suite itself runs on .venv's.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:?usage: scripts/python-smoke.sh PYTHON}
version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
venv=.venv-py$version
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" wheel --quiet --find-links .wheels --wheel-dir .wheels 'uWSGI>=2.0.31,<2.1'
"$venv/bin/pip" install --quiet --find-links .wheels -e '.[test]'
HOTSWAP_APP_RELOADS=3 "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_app.py \
    -k 'plain_wsgi_function_swaps_under_load or broken_release_is_rolled_back'
echo "python-smoke: Python $version ($python) passed"
