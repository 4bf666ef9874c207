#!/usr/bin/env bash
# Set up a virtual environment in .venv with the CPU build of torch and the plugin (editable, with tests).
# On Debian/Ubuntu as root it also installs Xvfb and the Qt/OpenGL libraries that headless napari tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxkbcommon-x11-0 libgl1 libegl1
    libgl1-mesa-dri libglx-mesa0 libfontconfig1 libdbus-1-3"
if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # shellcheck disable=SC2086
        apt-get install -y -qq --no-install-recommends $APT_PACKAGES >/dev/null
    elif ! command -v Xvfb >/dev/null 2>&1; then
        echo "note: for the napari tests install Xvfb and Qt's libraries:" \
             "sudo apt-get install" $APT_PACKAGES >&2
    fi
fi

PY=${PYTHON:-python3}
"$PY" -m venv .venv
.venv/bin/python -m pip install -q -U pip
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[testing]"
echo "ready: $(.venv/bin/spinesegdiff --version)"
