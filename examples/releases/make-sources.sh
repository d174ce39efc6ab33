#!/usr/bin/env bash
# The release folders docs/releases.md's session deploys: SRC/v1, v2, v3 (the repo's srv.py and
# srv.ini, and a table of TERMS terms whose version is the folder's name) and SRC/broken (v1
# with an import that fails). Heap mode: start the service with SRV_MODE=heap.
#   examples/releases/make-sources.sh SRC [TERMS]      (from the repo root; TERMS: 200000)
set -euo pipefail
src=${1:?usage: make-sources.sh SRC [TERMS]}
terms=${2:-200000}
repo=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
for version in v1 v2 v3 broken; do
    mkdir -p "$src/$version/data"
    cp "$repo/srv.py" "$repo/srv.ini" "$src/$version/"
    data_version=$version; [ "$version" = broken ] && data_version=v1
    (cd "$repo" && "$python" scripts/gen_resource.py --terms "$terms" --version "$data_version" \
        -o "$src/$version/data/terms.tsv")
done
echo "import no_such_module  # the broken release: its import fails" >> "$src/broken/srv.py"
echo "made $src/v1 $src/v2 $src/v3 $src/broken ($terms terms each)"
