"""Data sources (Fashion-MNIST IDX, image folders, Parquet, WebDataset tar shards), stable ids, and the seeded split.

Every source becomes rows of ``id`` (str), ``image`` (encoded bytes) and ``label`` (int, -1 when
unknown). Decoding happens later, inside the participant actors, so one unreadable image becomes
an error row instead of crashing a read task.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import DEFAULT_FASHION_MNIST_DIR, ConfigError, DataConfig
from .images import encode_png

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
# Default Fashion-MNIST split (DESIGN.md §5): train[0:10k] public, train[10k:60k] unlabeled D.
PUBLIC_SIZE = 10_000
SOURCE_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("label", pa.int64())])


# ---------------------------------------------------------------- Fashion-MNIST IDX
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_dir(path: Optional[str] = None) -> Path:
    """The IDX folder: ``path`` or the Debian package's location."""
    p = Path(path or DEFAULT_FASHION_MNIST_DIR).expanduser()
    if not (p / "train-images-idx3-ubyte.gz").exists() and not (p / "train-images-idx3-ubyte").exists():
        raise ConfigError(
            f"'data.path': no Fashion-MNIST IDX files in {p} "
            "(install them with: apt-get install -y dataset-fashion-mnist)"
        )
    return p


def load_fashion_mnist(split: str, path: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) for ``train`` or ``t10k``."""
    d = fashion_mnist_dir(path)

    def find(stem):
        for name in (stem + ".gz", stem):
            if (d / name).exists():
                return d / name
        raise ConfigError(f"'data.path': {stem} missing in {d}")

    x = read_idx(find(f"{split}-images-idx3-ubyte"))
    y = read_idx(find(f"{split}-labels-idx1-ubyte")).astype(np.int64)
    return x, y


def fashion_mnist_split(name: str, path: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """Named splits of the offline default: ``public``, ``unlabeled`` or ``test``."""
    if name == "test":
        return load_fashion_mnist("t10k", path)
    x, y = load_fashion_mnist("train", path)
    if name == "public":
        return x[:PUBLIC_SIZE], y[:PUBLIC_SIZE]
    if name == "unlabeled":
        return x[PUBLIC_SIZE:], y[PUBLIC_SIZE:]
    raise ValueError(f"unknown Fashion-MNIST split {name!r}")


def write_array_source(images: np.ndarray, labels: np.ndarray, ids: Sequence[str], out: Path,
                       rows_per_file: int = 10_000) -> None:
    """Write arrays as a Parquet source (id, PNG image, label) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(ids), rows_per_file):
        sl = slice(start, start + rows_per_file)
        table = pa.table(
            {"id": list(ids[sl]), "image": [encode_png(a) for a in images[sl]], "label": labels[sl]},
            schema=SOURCE_SCHEMA,
        )
        pq.write_table(table, out / f"part-{start // rows_per_file:05d}.parquet")


# ---------------------------------------------------------------- listing ids
def list_image_files(root: str | os.PathLike) -> list[str]:
    """Sorted relative paths of image files under ``root`` (ids for a folder source)."""
    root = Path(root)
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.lower().endswith(IMAGE_EXTENSIONS):
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(out)


def folder_classes(root: str | os.PathLike) -> list[str]:
    """Sorted class-subfolder names (empty when images sit directly in ``root``)."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir())


def label_for(rel_path: str, classes: Sequence[str]) -> int:
    """Label index from a relative path's first folder, -1 when it has none."""
    parts = Path(rel_path).parts
    if len(parts) > 1 and parts[0] in classes:
        return classes.index(parts[0])
    return -1


WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def webdataset_shards(path: Path) -> list[Path]:
    """The ``.tar`` shards of a WebDataset source (a folder of shards or one shard), sorted."""
    shards = [path] if path.is_file() else sorted(path.rglob("*.tar"))
    if not shards:
        raise ConfigError(f"'data.path': no .tar shards in {path}")
    return shards


def _wds_key(member: str) -> str:
    """WebDataset's sample key: the member path up to the first '.' of its file name."""
    head, _, base = member.rpartition("/")
    return (head + "/" if head else "") + base.split(".", 1)[0]


def webdataset_keys(shard: Path) -> list[str]:
    """The sample keys of one tar shard in member order (tar headers only; run inside a Ray task)."""
    import tarfile

    try:
        with tarfile.open(shard) as tf:
            return list(dict.fromkeys(_wds_key(m.name) for m in tf.getmembers() if m.isfile()))
    except (tarfile.TarError, OSError) as e:
        raise ConfigError(f"'data.path': {shard} is not a readable tar shard ({e})") from None


def webdataset_count(shards: Sequence[Path]) -> int:
    """Samples in the shards, from the tar headers (seeking past the members' data; one shard's headers are in
    memory at a time)."""
    import tarfile

    n = 0
    for f in shards:
        try:
            with tarfile.open(f) as tf:
                last = None
                for m in tf:
                    k = _wds_key(m.name) if m.isfile() else None
                    if k is not None and k != last:
                        n, last = n + 1, k
        except (tarfile.TarError, OSError) as e:
            raise ConfigError(f"'data.path': {f} is not a readable tar shard ({e})") from None
    return n


def webdataset_rows(batch: dict, prefixed: bool, keep: Optional[dict] = None) -> pa.Table:
    """read_webdataset rows -> (id, image bytes, label): the first image member (jpg/jpeg/png/webp; none: empty
    bytes, an error row later), the label from ``.cls`` (-1 without one). ``keep`` maps a shard's name to the keys
    kept of it (``data.limit``'s last shard); other shards are kept whole."""
    n = len(batch["__key__"])
    shard = [Path(u).stem for u in batch["__url__"]]
    ids = [f"{s}/{k}" if prefixed else str(k) for s, k in zip(shard, batch["__key__"])]
    def member(ext: str, i: int) -> Optional[bytes]:  # a sample without this member holds None or NaN
        v = batch[ext][i] if ext in batch else None
        return bytes(v) if isinstance(v, (bytes, bytearray, memoryview)) else None

    images, labels = [], []
    for i in range(n):
        images.append(next((b for b in (member(e, i) for e in WDS_IMAGE_EXTENSIONS) if b is not None), b""))
        cls = member("cls", i)
        try:
            labels.append(int(cls.decode().strip()) if cls is not None else -1)
        except ValueError:
            labels.append(-1)
    t = pa.table({"id": ids, "image": images, "label": labels}, schema=SOURCE_SCHEMA)
    if keep:
        mask = [s not in keep or str(k) in keep[s] for s, k in zip(shard, batch["__key__"])]
        t = t.filter(pa.array(mask, pa.bool_()))
    return t


def normalise_parquet_batch(batch: pa.Table) -> pa.Table:
    label = batch.column("label") if "label" in batch.column_names else pa.array([-1] * batch.num_rows)
    return pa.table(
        {"id": batch.column("id").cast(pa.string()), "image": batch.column("image").cast(pa.binary()),
         "label": label.cast(pa.int64())},
        schema=SOURCE_SCHEMA,
    )


def parquet_files(path: Path) -> list[Path]:
    """The Parquet files of a Parquet source, sorted; each must hold 'id' and 'image' columns."""
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    for f in files:
        names = pq.read_schema(f).names
        if "id" not in names or "image" not in names:
            raise ConfigError(f"'data.path': Parquet file {f} needs 'id' and 'image' columns")
    return files


def iter_image_files(root: str | os.PathLike) -> Iterable[str]:
    """Relative paths of the image files under ``root`` in a stable walk order (sorted folders and names),
    streamed: a folder of any size is listed in constant memory."""
    root = str(root)
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                yield os.path.relpath(os.path.join(dirpath, f), root)


def count_images(cfg: DataConfig) -> int:
    """Number of images the source will yield (after ``limit``), cheaply: IDX header, file list or Parquet
    metadata. Used to validate the config before any work starts."""
    if cfg.source == "fashion-mnist":
        d = fashion_mnist_dir(cfg.path)
        f = next(p for p in (d / "train-images-idx3-ubyte.gz", d / "train-images-idx3-ubyte") if p.exists())
        with (gzip.open if f.suffix == ".gz" else open)(f, "rb") as fh:
            n = max(struct.unpack(">I", fh.read(8)[4:8])[0] - PUBLIC_SIZE, 0)
    else:
        path = Path(cfg.path).expanduser()
        if cfg.source == "images":
            n = sum(1 for _ in iter_image_files(path))
        elif cfg.source == "webdataset":
            n = webdataset_count(webdataset_shards(path))
        else:
            n = sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(path))
    return n if cfg.limit is None else min(n, cfg.limit)


# ---------------------------------------------------------------- split
def _hash64(values: Iterable[str], salt: str) -> np.ndarray:
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(f"{salt}:{v}".encode(), digest_size=8).digest(), "little") for v in values),
        dtype=np.uint64,
    )


def owner_of(ids: Sequence[str], k: int, seed: int, shares: Optional[Sequence[float]] = None) -> np.ndarray:
    """Participant index (0..k-1) that owns each id: a seeded hash, so shards are disjoint and complete.

    ``shares`` (one weight >= 0 per participant) gives participant j about ``shares[j] / sum(shares)`` of the
    ids and none at weight 0; equal shares (or None) are the plain ``hash % k`` split."""
    h = _hash64(ids, f"owner:{seed}")
    if shares is None or len(set(shares)) == 1:
        return (h % np.uint64(k)).astype(np.int64)
    w = np.asarray(shares, dtype=np.float64)
    if len(w) != k or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"shares must be {k} weights >= 0 with a positive sum, got {list(shares)}")
    edges = np.cumsum(w / w.sum())[:-1]
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # uniform in [0, 1), as unit_hash
    return np.searchsorted(edges, u, side="right").astype(np.int64)


def unit_hash(ids: Sequence[str], salt: str) -> np.ndarray:
    """A seeded hash of each id as a float, uniform in [0, 1)."""
    return (_hash64(ids, salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def shared_size(n: int, fraction: float, minimum: int) -> int:
    """The expected size m of the shared subset S: ``fraction`` of n, at least ``minimum``."""
    return max(minimum, int(math.ceil(fraction * n)))


def shared_threshold(n: int, fraction: float, minimum: int) -> float:
    """t = m / n: an id is in S when its seeded hash is below t, so |S| is Binomial(n, t) with mean m and no
    global sort or id list is needed (``n`` is the cheap count from metadata)."""
    m = shared_size(n, fraction, minimum)
    if m > n:
        raise ConfigError(f"'shared.min': the shared subset ({m} images) is bigger than the data ({n} images)")
    return m / n


def in_shared(ids: Sequence[str], seed: int, threshold: float) -> np.ndarray:
    """Membership of S for each id: a pure function of the id, the seed and the threshold."""
    return unit_hash(ids, f"shared:{seed}") < threshold


def shared_subset(ids: Sequence[str], fraction: float, minimum: int, seed: int) -> list[str]:
    """The shared subset S of a complete id list (sorted): the reference for what the split stage writes."""
    t = shared_threshold(len(ids), fraction, minimum)
    return sorted(i for i, s in zip(ids, in_shared(ids, seed, t)) if s)


def split(ids: Sequence[str], k: int, fraction: float, minimum: int, seed: int,
          shares: Optional[Sequence[float]] = None):
    """Shards D(0..k-1) as lists of ids, plus the shared subset S (the reference for the split stage)."""
    owner = owner_of(ids, k, seed, shares)
    shards = [[i for i, o in zip(ids, owner) if o == j] for j in range(k)]
    return shards, shared_subset(ids, fraction, minimum, seed)
