#!/usr/bin/env bash
# System packages the tests need on a headless Debian/Ubuntu machine: Xvfb and the Qt xcb platform's
# dependencies (napari), and Chromium (JupyterLab in a real browser, driven by Playwright; no browser is
# downloaded). Run as root (CI does); skipped where apt-get is absent or both are already there.
set -euo pipefail
if { command -v Xvfb && command -v chromium; } >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
  xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-randr0 libxcb-render-util0 libxcb-shape0 \
  libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0 libxcb-cursor0 libgl1 libegl1 libfontconfig1 libdbus-1-3 chromium >/dev/null
