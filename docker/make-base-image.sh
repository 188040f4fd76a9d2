#!/usr/bin/env bash
# Make a local Debian + Python 3.11 base image from a Debian package mirror, for hosts that cannot pull from
# an image registry (air-gapped clusters, HPC sites with a local Debian mirror). The result is an ordinary
# local image; pass it to the project's Dockerfile:
#
#   sudo docker/make-base-image.sh --mirror http://deb.example.org/debian --ca-bundle /etc/corp/root-ca.pem
#   podman build -f docker/Dockerfile --build-arg BASE_IMAGE=localhost/slak-base:bookworm-py311 \
#       --build-arg VARIANT=cpu --build-arg SLAK_BUILD_CUDA_EXT=0 -t slak-orchestrator:0.1.0-cpu .
#
# What the image holds: a debootstrap "minbase" Debian, python3 (3.11 on bookworm) with venv and pip,
# ca-certificates, and APT sources pointing at the same mirror, so `apt-get install` in later build steps
# works without the internet. With --ca-bundle, the given PEM certificate(s) (e.g. a corporate TLS-inspection
# root) are added to the image's trust store, and pip, requests, OpenSSL and Node read that store through
# PIP_CERT, REQUESTS_CA_BUNDLE, SSL_CERT_FILE and NODE_EXTRA_CA_CERTS.
#
# Needs root (debootstrap and chroot), debootstrap, and podman or docker. Nothing is left behind but the image.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: make-base-image.sh [options]
  --mirror URL           Debian mirror for debootstrap and the image's APT sources
                         (default: the first URIs: line of /etc/apt/sources.list.d/debian.sources,
                         else http://deb.debian.org/debian)
  --security-mirror URL  Debian security mirror written into the image's APT sources (default: none)
  --suite NAME           Debian release (default: bookworm, whose python3 is 3.11)
  --ca-bundle FILE       extra PEM certificate(s) to trust inside the image (repeatable)
  --tag NAME             image name (default: localhost/slak-base:bookworm-py311)
  --engine podman|docker container engine to import into (default: podman if installed, else docker)
  --workdir DIR          scratch folder for the root file system (default: a new folder in /var/tmp)
  -h, --help             this text
EOF
}

die() { echo "make-base-image: $*" >&2; exit 2; }

mirror="" security_mirror="" suite=bookworm tag=localhost/slak-base:bookworm-py311 engine="" workdir=""
ca_bundles=()
while [ $# -gt 0 ]; do
    case "$1" in
        --mirror) mirror=${2:?--mirror needs a URL}; shift 2 ;;
        --security-mirror) security_mirror=${2:?--security-mirror needs a URL}; shift 2 ;;
        --suite) suite=${2:?--suite needs a name}; shift 2 ;;
        --ca-bundle) ca_bundles+=("${2:?--ca-bundle needs a file}"); shift 2 ;;
        --tag) tag=${2:?--tag needs a name}; shift 2 ;;
        --engine) engine=${2:?--engine needs podman or docker}; shift 2 ;;
        --workdir) workdir=${2:?--workdir needs a folder}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

[ "$(id -u)" = 0 ] || die "run as root (debootstrap and chroot need it)"
command -v debootstrap >/dev/null || die "debootstrap is not installed (Debian/Ubuntu: apt-get install debootstrap)"
if [ -z "$engine" ]; then
    if command -v podman >/dev/null; then engine=podman
    elif command -v docker >/dev/null; then engine=docker
    else die "neither podman nor docker is installed"; fi
fi
case "$engine" in podman|docker) ;; *) die "--engine must be podman or docker, not '$engine'" ;; esac
command -v "$engine" >/dev/null || die "$engine is not installed"
for f in "${ca_bundles[@]}"; do
    [ -r "$f" ] || die "--ca-bundle $f: no such readable file"
    grep -q -- "-----BEGIN CERTIFICATE-----" "$f" || die "--ca-bundle $f: no PEM certificate in it"
done
if [ -z "$mirror" ]; then
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
fi

if [ -z "$workdir" ]; then
    workdir=$(mktemp -d /var/tmp/slak-base.XXXXXX)
else
    mkdir -p "$workdir"
    [ -z "$(ls -A "$workdir")" ] || die "--workdir $workdir is not empty"
fi
rootfs="$workdir/rootfs"
cleanup() {
    for m in proc sys dev/pts dev; do mountpoint -q "$rootfs/$m" 2>/dev/null && umount "$rootfs/$m"; done
    rm -rf "$workdir"
}
trap cleanup EXIT

echo "make-base-image: debootstrap $suite from $mirror (log: $workdir/debootstrap.log)"
if ! debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        "$suite" "$rootfs" "$mirror" >"$workdir/debootstrap.log" 2>&1; then
    tail -n 20 "$workdir/debootstrap.log" >&2
    die "debootstrap failed (is $mirror a Debian mirror that carries $suite?)"
fi

{
    echo "deb $mirror $suite main"
    echo "deb $mirror $suite-updates main"
    [ -z "$security_mirror" ] || echo "deb $security_mirror $suite-security main"
} >"$rootfs/etc/apt/sources.list"

for i in "${!ca_bundles[@]}"; do
    cp "${ca_bundles[$i]}" "$rootfs/usr/local/share/ca-certificates/extra-ca-$i.crt"
done
chroot "$rootfs" update-ca-certificates >/dev/null
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
# The image uses a virtual environment for everything it installs; `python` names the system python3.
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"

python_version=$(chroot "$rootfs" python3 -c 'import platform; print(platform.python_version())')
bundle=/etc/ssl/certs/ca-certificates.crt
echo "make-base-image: importing as $tag (Debian $suite, Python $python_version)"
tar -C "$rootfs" -c . | "$engine" import \
    --change 'CMD ["/bin/bash"]' \
    --change "ENV LANG=C.UTF-8" \
    --change "ENV PIP_CERT=$bundle" --change "ENV REQUESTS_CA_BUNDLE=$bundle" \
    --change "ENV SSL_CERT_FILE=$bundle" --change "ENV NODE_EXTRA_CA_CERTS=$bundle" \
    - "$tag" >/dev/null
"$engine" run --rm "$tag" python3 -c 'import ssl, sys, venv; print("ok", sys.version.split()[0])' >/dev/null \
    || die "the imported image $tag does not run python3"
echo "make-base-image: done: $tag"
