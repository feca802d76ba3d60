#!/usr/bin/env bash
# Create .venv with pinned torch, medexplore (editable) and the napari plugin. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch is pinned: an unpinned resolve can pull a different (multi-GB) build.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,notebooks,napari]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e napari_plugin
.venv/bin/python -c "import medexplore, torch, timm; print('medexplore ready: torch', torch.__version__, 'timm', timm.__version__)"
# UMAP's numba code compiled once into the cache, so a user's first UMAP view does not wait for it
.venv/bin/python -c "from medexplore.analysis.projections import warm_umap; print(f'UMAP compiled in {warm_umap():.0f} s')"
# napari's numba code for box and mask layers compiled once into the cache, so a user's first Run does not wait for it
.venv/bin/python -c "from napari_medexplore._layers import warm_layers; print(f'napari layers compiled in {warm_layers():.0f} s')"
