#!/usr/bin/env bash
# Build the test images without any registry, by importing rootfs tarballs.
#
#   scripts/build-test-images.sh ENGINE_CLI...
#   e.g. scripts/build-test-images.sh docker -H unix:///tmp/x/docker.sock
#        scripts/build-test-images.sh podman --url unix:///tmp/y/podman.sock
#
# Images (built only when absent from the engine):
#   localhost/pfleet-test/busybox:1   busybox-static, all applets, /etc/passwd, /tmp; CMD /bin/sh
#   localhost/pfleet-test/python:mini busybox + the host's Debian /usr/bin/python3.11, its
#                                     shared libraries and stdlib; CMD python3
# The rootfs tarballs are cached in $PFLEET_IMAGE_CACHE (default .pfleet/images/) so a second
# engine (podman after docker, or the next run) only pays for the import.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 ENGINE_CLI..." >&2
    exit 2
fi
ENGINE=("$@")

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${PFLEET_IMAGE_CACHE:-$ROOT/.pfleet/images}
BUSYBOX_BIN=${BUSYBOX_BIN:-/bin/busybox}
HOST_PYTHON=${HOST_PYTHON:-/usr/bin/python3.11}
BUSYBOX_IMAGE=localhost/pfleet-test/busybox:1
PYTHON_IMAGE=localhost/pfleet-test/python:mini
# Bump when the recipe below changes, so stale cached tarballs are rebuilt.
RECIPE=1

mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Present and built by this recipe (images carry ENV PFLEET_TEST_IMAGE=r<recipe>).
have_image() {
    local env
    env=$("${ENGINE[@]}" image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' \
        "$1" 2>/dev/null) || return 1
    grep -qx "PFLEET_TEST_IMAGE=r$RECIPE" <<<"$env"
}

# Copy a file (following symlinks) into the rootfs at the same path.
copy_in() {
    local rootfs=$1 f=$2
    [ -e "$rootfs$f" ] && return 0
    mkdir -p "$rootfs$(dirname "$f")"
    cp -L "$f" "$rootfs$f"
}

make_busybox_rootfs() {
    local rootfs=$1 a
    [ -x "$BUSYBOX_BIN" ] || { echo "$BUSYBOX_BIN missing (apt-get install busybox-static)" >&2; exit 1; }
    if ldd "$BUSYBOX_BIN" >/dev/null 2>&1; then
        echo "$BUSYBOX_BIN is dynamically linked; install busybox-static" >&2
        exit 1
    fi
    mkdir -p "$rootfs"/{bin,etc,tmp,root}
    chmod 1777 "$rootfs/tmp"
    cp "$BUSYBOX_BIN" "$rootfs/bin/busybox"
    for a in $("$rootfs/bin/busybox" --list); do
        [ "$a" = busybox ] || ln -sf busybox "$rootfs/bin/$a"
    done
    echo 'root:x:0:0:root:/root:/bin/sh' >"$rootfs/etc/passwd"
    echo 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >>"$rootfs/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
}

make_python_rootfs() {
    local rootfs=$1 l so
    [ -x "$HOST_PYTHON" ] || { echo "$HOST_PYTHON missing (apt-get install python3)" >&2; exit 1; }
    make_busybox_rootfs "$rootfs"
    mkdir -p "$rootfs/usr/bin" "$rootfs/usr/lib"
    cp "$HOST_PYTHON" "$rootfs/usr/bin/python3.11"
    ln -s python3.11 "$rootfs/usr/bin/python3"
    ln -s python3.11 "$rootfs/usr/bin/python"
    for l in $(ldd "$HOST_PYTHON" | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do
        copy_in "$rootfs" "$l"
    done
    cp -a /usr/lib/python3.11 "$rootfs/usr/lib/"
    rm -rf "$rootfs/usr/lib/python3.11/test" "$rootfs/usr/lib/python3.11/dist-packages"
    find "$rootfs/usr/lib/python3.11" -name __pycache__ -prune -exec rm -rf {} +
    while IFS= read -r so; do
        for l in $(ldd "$so" 2>/dev/null | awk '/=>/ {print $3}'); do
            copy_in "$rootfs" "$l"
        done
    done < <(find "$rootfs/usr/lib/python3.11/lib-dynload" -name '*.so')
    if [ -d /etc/ssl/certs ]; then
        mkdir -p "$rootfs/etc/ssl"
        cp -aL /etc/ssl/certs "$rootfs/etc/ssl/" 2>/dev/null || true
    fi
}

# tarball NAME MAKER -> prints the cached tarball path, building it when missing.
tarball() {
    local name=$1 maker=$2 tar=$CACHE/$1-r$RECIPE.tar
    if [ ! -s "$tar" ]; then
        "$maker" "$WORK/$name"
        tar --numeric-owner -C "$WORK/$name" -cf "$WORK/$name.tar" .
        mv -f "$WORK/$name.tar" "$tar" # atomic: concurrent builders never see half a file
        rm -rf "${WORK:?}/$name"
    fi
    echo "$tar"
}

import_image() {
    local image=$1 tar=$2
    shift 2
    local changes=() c
    for c in "$@"; do changes+=(-c "$c"); done
    "${ENGINE[@]}" import "${changes[@]}" "$tar" "$image" >/dev/null
    have_image "$image" || { echo "import of $image did not produce the image" >&2; exit 1; }
}

if ! have_image "$BUSYBOX_IMAGE"; then
    tar=$(tarball busybox make_busybox_rootfs) # an assignment, so set -e sees failures
    import_image "$BUSYBOX_IMAGE" "$tar" \
        'ENV PATH=/bin' "ENV PFLEET_TEST_IMAGE=r$RECIPE" 'CMD ["/bin/sh"]'
    echo "built $BUSYBOX_IMAGE" >&2
fi
if ! have_image "$PYTHON_IMAGE"; then
    tar=$(tarball python-mini make_python_rootfs)
    import_image "$PYTHON_IMAGE" "$tar" \
        'ENV PATH=/usr/bin:/bin' 'ENV LANG=C.UTF-8' "ENV PFLEET_TEST_IMAGE=r$RECIPE" \
        'CMD ["python3"]'
    echo "built $PYTHON_IMAGE" >&2
fi
