#!/usr/bin/env bash
# The Python base image built offline from Debian's packages, for machines that cannot reach an image
# registry (no `FROM python:3.11-slim-bookworm` pull): mmdebstrap makes a Debian bookworm root
# filesystem with Python 3.11 and pip from the mirror apt is configured with, and podman imports it.
#
#   deploy/base-image.sh [IMAGE]        (or `make base-image`)
#
# IMAGE (default localhost/fedlora-base:bookworm) is what the Dockerfile's BASE_IMAGE build argument
# then names: podman build --build-arg BASE_IMAGE=localhost/fedlora-base:bookworm ... (docs/deploy.md).
# Needs root, mmdebstrap and podman (apt-get install -y podman runc podman-compose mmdebstrap). The
# tarball is kept in $FEDLORA_CI_CACHE (default .cache/deploy) as base-bookworm.tar; an existing image
# is left as it is (remove it with `podman rmi IMAGE` to build again). Uses deploy/containers.conf
# unless CONTAINERS_CONF is set.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${1:-localhost/fedlora-base:bookworm}
CACHE=${FEDLORA_CI_CACHE:-$PWD/.cache/deploy}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/containers.conf}
fail() { printf 'base-image: error: %s\n' "$*" >&2; exit 1; }

for tool in podman mmdebstrap; do
  command -v "$tool" >/dev/null || fail "$tool is missing: apt-get install -y podman runc podman-compose mmdebstrap"
done
if podman image exists "$IMAGE"; then
  echo "base-image: $IMAGE exists already"
  exit 0
fi
mkdir -p "$CACHE"
tarball=$CACHE/base-bookworm.tar
if [[ ! -s "$tarball" ]]; then
  mirror=$(grep -h -E '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | grep -v -- '-security' | awk '$1 == "URIs:" { print $2; exit } $1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' || true)
  [[ -n "$mirror" ]] || fail "found no Debian mirror in /etc/apt/sources.list*; add one for apt first"
  echo "base-image: mmdebstrap bookworm from $mirror"
  mmdebstrap --quiet --format=tar --variant=apt --include=python3,python3-pip,python3-venv,ca-certificates,passwd \
    bookworm "$tarball.part" "$mirror" || fail "mmdebstrap failed (see above)"
  mv "$tarball.part" "$tarball"
fi
podman import --change 'CMD ["/bin/bash"]' "$tarball" "$IMAGE" >/dev/null || fail "podman import failed"
echo "base-image: $IMAGE imported from $tarball"
