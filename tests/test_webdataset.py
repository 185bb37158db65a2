"""A WebDataset source (data.source: webdataset; the tar layout img2dataset writes): ids from each sample's key
(prefixed by the shard's name when a key repeats across shards), labels from .cls, and a corrupt member or a
sample without an image becoming an error row with its reason while every other image is optimized."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from coopt_ray.config import ConfigError, DataConfig, load_config
from coopt_ray.data import count_images

from conftest import write_config


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def _png(v: int) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(np.full((12, 12, 3), v, np.uint8)).save(b, "PNG")
    return b.getvalue()


def make_shards(root: Path, shards: int = 2, per: int = 30, corrupt=(), no_image=()) -> Path:
    """``shards`` tars of ``per`` samples (keys 000000.. repeat in every shard): .png (.webp for odd keys is not
    needed: one image member each), .cls = key % 10, .json; ``corrupt`` / ``no_image`` name (shard, key) pairs."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:05d}.tar", "w") as tf:
            for i in range(per):
                key = f"{i:06d}"
                if (s, i) not in no_image:
                    _add(tf, f"{key}.png", b"\x89PNG garbage" if (s, i) in corrupt else _png(8 * i))
                _add(tf, f"{key}.cls", str(i % 10).encode())
                _add(tf, f"{key}.json", json.dumps({"caption": f"sample {i}"}).encode())
    return root


def _split_ids(tmp_path, tiny_models, name, **data) -> list[str]:
    from coopt_ray.split import run_split

    cfg = load_config(write_config(tmp_path / f"{name}.yaml", tiny_models[:2],
                                   data={"source": "webdataset", **data}, shared={"fraction": 0.5, "min": 2}))
    split = run_split(cfg, tmp_path / name, log=lambda s: None)
    ids = pq.read_table(split.root, columns=["id"]).column("id").to_pylist()
    assert len(ids) == split.total
    return ids


def test_webdataset_ids_labels_and_limit(tmp_path, tiny_models, ray_session):
    root = make_shards(tmp_path / "wds", shards=2, per=5)
    ids = _split_ids(tmp_path, tiny_models, "both", path=str(root))
    assert sorted(ids) == [f"shard-0000{s}/{i:06d}" for s in range(2) for i in range(5)]  # keys repeat: prefixed
    one = _split_ids(tmp_path, tiny_models, "one", path=str(root / "shard-00001.tar"))
    assert sorted(one) == [f"{i:06d}" for i in range(5)]  # keys unique: the key itself
    seven = _split_ids(tmp_path, tiny_models, "seven", path=str(root), limit=7)
    assert sorted(seven) == [f"shard-00000/{i:06d}" for i in range(5)] + ["shard-00001/000000", "shard-00001/000001"]
    assert count_images(DataConfig(source="webdataset", path=str(root), limit=7)) == 7
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.tar").write_bytes(b"not a tar at all" * 10)
    with pytest.raises(ConfigError, match="not a readable tar shard"):
        count_images(DataConfig(source="webdataset", path=str(tmp_path / "bad")))


@pytest.mark.slow
def test_webdataset_source_optimizes_with_a_corrupt_member_as_an_error_row(tmp_path, tiny_models, ray_session):
    from coopt_ray.pipeline import run_optimize

    root = make_shards(tmp_path / "wds", shards=2, per=30, corrupt={(1, 3)}, no_image={(0, 7)})
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_models[:2],
                                   data={"source": "webdataset", "path": str(root), "limit": None}))
    man = run_optimize(cfg, tmp_path / "run", log=lambda s: None)
    assert man["total_rows"] == 60 and man["optimized_rows"] == 58 and man["error_rows"] == 2
    errs = pq.read_table(tmp_path / "run" / "errors").to_pydict()
    reasons = dict(zip(errs["id"], errs["error"]))
    assert reasons["shard-00001/000003"] == "not a recognised image format"
    assert reasons["shard-00000/000007"] == "empty file (0 bytes)"
    opt = pq.read_table(tmp_path / "run" / "optimized", columns=["id", "label"]).to_pydict()
    labels = dict(zip(opt["id"], opt["label"]))
    assert len(labels) == 58 and labels["shard-00001/000012"] == 2 and labels["shard-00000/000029"] == 9
