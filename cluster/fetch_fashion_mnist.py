"""Fetch the Fashion-MNIST IDX files where the Debian package `dataset-fashion-mnist` is not available.

    python cluster/fetch_fashion_mnist.py [DIR]     # default: /usr/share/datasets/fashion-mnist

Used by the cluster setups (cluster/*.yaml, cluster/Dockerfile) on images whose distribution lacks
the package; needs internet. On Debian/Ubuntu with the package, `apt-get install dataset-fashion-mnist`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

MIRRORS = ("https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
           "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "/usr/share/datasets/fashion-mnist")
    if not os.access(out if out.exists() else out.parent, os.W_OK):  # e.g. /usr/share as a normal user
        subprocess.run(["sudo", "mkdir", "-p", str(out)], check=True)
        subprocess.run(["sudo", "chown", str(os.getuid()), str(out)], check=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (out / name).exists():
            continue
        for base in MIRRORS:
            try:
                urllib.request.urlretrieve(base + name, out / (name + ".part"))
                os.replace(out / (name + ".part"), out / name)
                break
            except OSError as e:
                print(f"fetch {base + name}: {e}", file=sys.stderr)
        else:
            print(f"could not fetch {name}", file=sys.stderr)
            return 1
    print(f"Fashion-MNIST in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
