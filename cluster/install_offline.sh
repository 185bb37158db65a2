#!/usr/bin/env bash
# Install a `make bundle` archive with no network, on a machine that already has PyTorch:
#     bash cluster/install_offline.sh dist/coopt-bundle-py312.tar.xz
# The machine's torch (and torchvision, if any) stay as they are: they are constraints here, and coopt_ray itself
# installs with --no-deps, so the project's own torch pin does not apply. A package the machine already has at a
# version that satisfies the bundle's needs is kept. The bundle's Fashion-MNIST IDX files (if it carries them) go to
# $COOPT_DATA_DIR (default /usr/share/datasets/fashion-mnist, the Debian package's folder) unless already there.
# Ends with one line: "coopt bundle ok: ..." (exit 0), or a line saying what is missing (exit 2).
set -euo pipefail
BUNDLE=${1:?usage: cluster/install_offline.sh BUNDLE.tar.xz}
PY=${PYTHON:-python3}
DATA_DIR=${COOPT_DATA_DIR:-/usr/share/datasets/fashion-mnist}
work=$(mktemp -d "${TMPDIR:-/tmp}/coopt-bundle.XXXXXX")
trap 'rm -rf "$work"' EXIT
# tar needs the xz program for -J; Python's tarfile does not
tar -xJf "$BUNDLE" -C "$work" 2>/dev/null || "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$BUNDLE" "$work"
b=$(echo "$work"/coopt-bundle-*)
want=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["python"])' "$b/bundle.json")
have=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$want" != "$have" ]; then
  echo "install_offline: the bundle is for Python $want, but $PY is Python $have (make bundle PY_TAG=$have)" >&2; exit 2
fi
if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "install_offline: $PY has no torch; install PyTorch first (the bundle carries everything but torch)" >&2; exit 2
fi
# the machine's own torch stack, pinned as it is
"$PY" - >"$work/constraints.txt" <<'PYEOF'
import importlib.metadata as md
for n in ("torch", "torchvision"):
    try:
        print(f"{n}=={md.version(n)}")
    except md.PackageNotFoundError:
        pass
PYEOF
if ! grep -q '^torchvision==' "$work/constraints.txt"; then
  echo "install_offline: warning: no torchvision here; timm and open_clip_torch need one matching torch $("$PY" -c 'import torch; print(torch.__version__)')" >&2
fi
pipi() { "$PY" -m pip install --no-index --no-cache-dir --disable-pip-version-check --find-links "$b/wheels" "$@"; }
pipi --constraint "$work/constraints.txt" -r "$b/requirements.txt"
pipi --no-deps --force-reinstall coopt_ray
if [ -d "$b/data/fashion-mnist" ] && [ ! -e "$DATA_DIR/train-images-idx3-ubyte.gz" ] && [ ! -e "$DATA_DIR/train-images-idx3-ubyte" ]; then
  mkdir -p "$DATA_DIR" && cp "$b"/data/fashion-mnist/* "$DATA_DIR"/
fi
cd "$work"  # the installed package, not a checkout's copy
"$PY" -c '
import torch, ray, open_clip, timm, lightly, pyarrow, coopt_ray.cli
from coopt_ray.data import fashion_mnist_dir
try:
    data = str(fashion_mnist_dir())
except Exception as e:
    data = "missing (" + str(e).split("(")[0].strip() + ")"
print(f"coopt bundle ok: ray {ray.__version__}, torch {torch.__version__} (cuda {torch.cuda.is_available()}), "
      f"open_clip {open_clip.__version__}, timm {timm.__version__}, lightly {lightly.__version__}, "
      f"pyarrow {pyarrow.__version__}, fashion-mnist {data}")
'
