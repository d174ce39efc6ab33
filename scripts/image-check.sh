#!/usr/bin/env bash
# Build the image and swap a release in it: `podman` or `docker`, wherever one runs the
# Dockerfile's base image (not on the machine the suite runs on: no registry to pull it from,
# and its podman refuses the host's hybrid cgroups; docs/containers.md has what was tried).
#   scripts/image-check.sh [podman|docker]
set -euo pipefail
cd "$(dirname "$0")/.."
runtime=${1:-podman}
tag=hotswap-check:latest
"$runtime" build -t "$tag" .
container=$("$runtime" run -d "$tag")
trap '"$runtime" rm -f "$container" >/dev/null' EXIT
"$runtime" exec "$container" hotswap probe --timeout 60
"$runtime" exec "$container" hotswap reload
echo "image-check: $tag built, served and swapped a release with $runtime"
