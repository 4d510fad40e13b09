#!/usr/bin/env bash
# Install what finola needs on a fresh Debian/Ubuntu machine: `bash install.sh` (to train) or `bash install.sh dev`
# (to run the tests too). The embedded data ships as Debian packages (the photos' wallpapers; Fashion-MNIST for the
# tests), the Python packages from requirements*.txt into the active Python (a venv is best). Without apt-get the
# Debian part is skipped with a note: `photos` then trains on its 7 scikit-image photos alone.
set -euo pipefail
cd "$(dirname "$0")"

packages="plasma-workspace-wallpapers ukui-wallpapers"
requirements=requirements.txt
if [ "${1:-}" = dev ]; then
  packages="$packages dataset-fashion-mnist"
  requirements=requirements-dev.txt
elif [ -n "${1:-}" ]; then
  echo "install.sh: expected no argument or 'dev', got '$1'" >&2
  exit 2
fi

if command -v dpkg >/dev/null && dpkg -s $packages >/dev/null 2>&1; then
  :  # already there
elif command -v apt-get >/dev/null; then
  sudo=$( [ "$(id -u)" = 0 ] || command -v sudo || true )
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $packages >/dev/null
else
  echo "install.sh: no apt-get: skipping the Debian packages ($packages)" >&2
fi

# torch is pinned to its CPU build in requirements.txt; requirements-nodeps.txt holds data-only wheels that must come
# without their dependencies (deepforest would pull in Lightning and a CUDA torch)
python3 -m pip install -q -r $requirements
python3 -m pip install -q --no-deps -r requirements-nodeps.txt
