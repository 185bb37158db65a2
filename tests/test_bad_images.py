"""Bad images (issue 5): an image folder where ~3% of the files are broken, plus unusual modes and one huge
image. Every good image is optimized (unusual modes are converted, not dropped), every bad one is in
RUN/errors/ with its reason, the counts add up, and ``--max-error-fraction`` fails the run with a clear
message past that fraction (exit 1) while still writing the errors table; the rerun resumes.
"""
from __future__ import annotations

import functools
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from coopt_ray import cli
from coopt_ray.embeddings import column_matrix
from coopt_ray.images import decode_image
from coopt_ray.rundir import DONE

from conftest import write_config


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(rng, h=32, w=32) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@functools.lru_cache(maxsize=1)
def _huge_jpeg() -> bytes:
    """A 6000x6000 JPEG (~0.5 MB on disk; encoded once, it takes seconds)."""
    huge = Image.new("RGB", (6000, 6000), (200, 30, 40))
    huge.paste((10, 200, 30), (0, 0, 3000, 6000))
    return _encode(huge, "JPEG", quality=50)


def unusual_images(rng) -> dict[str, bytes]:
    """Readable images in modes other than 8-bit RGB; each must be converted, not dropped."""
    base = _rgb(rng)
    grad16 = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 61).astype(np.uint16)  # uses the 16 bits
    return {
        "cmyk.jpg": _encode(base.convert("CMYK"), "JPEG", quality=90),
        "gray16.png": _encode(Image.fromarray(grad16), "PNG"),  # mode I;16
        "palette.png": _encode(base.convert("P"), "PNG"),
        "gray_alpha.png": _encode(base.convert("LA"), "PNG"),
        "rgba.png": _encode(base.convert("RGBA"), "PNG"),
        "bilevel.png": _encode(base.convert("1"), "PNG"),
        "gray.jpg": _encode(base.convert("L"), "JPEG"),
        "huge.jpg": _huge_jpeg(),  # 6000x6000
    }


def bad_images(rng) -> dict[str, tuple[bytes, str]]:
    """Unreadable files with image extensions, and the reason each must be reported with."""
    jpg = _encode(_rgb(rng), "JPEG", quality=90)
    png = _encode(_rgb(rng), "PNG")
    return {
        "truncated.jpg": (jpg[: len(jpg) // 2], "unreadable image: image file is truncated"),
        "truncated.png": (png[: len(png) // 2], "unreadable image: image file is truncated"),
        "empty.png": (b"", "empty file (0 bytes)"),
        "text.jpg": (b"this is a text file, not a JPEG\n", "not a recognised image format"),
        "text.png": (b"<html>not a PNG either</html>\n", "not a recognised image format"),
    }


def build_folder(root: Path, n_good: int = 150, seed: int = 0):
    """Class subfolders with good, unusual and bad files (a dangling link among the bad); returns (good ids, unusual
    ids, {bad id: reason})."""
    rng = np.random.default_rng(seed)
    classes = ["bag", "boot"]
    for c in classes:
        (root / c).mkdir(parents=True)
    good, unusual, bad = [], [], {}
    for i in range(n_good):
        c = classes[i % 2]
        img = _rgb(rng, int(rng.integers(20, 48)), int(rng.integers(20, 48)))
        name = f"{c}/img{i:04d}." + ("png" if i % 3 else "jpg")
        (root / name).write_bytes(_encode(img, "PNG" if name.endswith("png") else "JPEG"))
        good.append(name)
    for j, (fname, data) in enumerate(unusual_images(rng).items()):
        name = f"{classes[j % 2]}/{fname}"
        (root / name).write_bytes(data)
        unusual.append(name)
    for j, (fname, (data, reason)) in enumerate(bad_images(rng).items()):
        name = f"{classes[j % 2]}/{fname}"
        (root / name).write_bytes(data)
        bad[name] = reason
    (root / "boot" / "gone.png").symlink_to(root.parent / "deleted.png")  # listed, but it cannot be opened
    bad["boot/gone.png"] = "cannot read file: No such file"
    (root / "bag" / "notes.txt").write_text("not an image extension: not part of the data set\n")
    return good, unusual, bad


# ---------------------------------------------------------------- decode_image, no Ray
def test_unusual_modes_convert_to_rgb_with_content():
    rng = np.random.default_rng(1)
    for name, data in unusual_images(rng).items():
        img = decode_image(data)
        assert img.mode == "RGB", name
        a = np.asarray(img)
        assert a.std() > 10, f"{name}: converted to a flat image"
    g = np.asarray(decode_image(unusual_images(rng)["gray16.png"]))
    assert g.min() == 0 and g.max() == 255  # 16-bit range stretched, not clipped to 0/255
    assert decode_image(unusual_images(rng)["huge.jpg"]).size[0] <= 1500  # JPEG draft: decoded reduced


def test_transparent_pixels_composite_on_white():
    la = Image.new("LA", (8, 8), (0, 0))  # black, fully transparent
    assert np.asarray(decode_image(_encode(la, "PNG"))).min() == 255


@pytest.mark.parametrize("name", sorted(bad_images(np.random.default_rng(0))))
def test_bad_file_raises_value_error_with_reason(name):
    data, reason = bad_images(np.random.default_rng(0))[name]
    with pytest.raises(ValueError, match=re.escape(reason.split(":")[0])):
        decode_image(data)


def _embed_batch(rng, images: list) -> dict:
    n = len(images)
    return {"id": np.array([f"x{i}" for i in range(n)], dtype=object), "image": np.array(images, dtype=object),
            "owned": np.ones(n, bool), "is_shared": np.zeros(n, bool), "label": np.zeros(n, np.int64)}


def test_embedder_files_unreadable_images_and_fails_the_batch_on_anything_else(tiny_models, monkeypatch):
    from coopt_ray.optimize import ParticipantEmbedder

    rng = np.random.default_rng(0)
    emb = ParticipantEmbedder(tiny_models[0], None, use_gpu=False)
    good = _encode(_rgb(rng), "PNG")
    out = emb(_embed_batch(rng, [good, b"", good]))
    assert list(out["error"]) == ["", "empty file (0 bytes)", ""]
    assert np.abs(out["embedding"][[0, 2]]).sum() > 0 and not out["embedding"][1].any()

    def broken(_img):  # a bug or an out-of-memory error is not a bad image
        raise MemoryError("no memory left")

    monkeypatch.setattr("coopt_ray.preprocess.decode_image", broken)  # decoding: preprocess.decode_batch
    with pytest.raises(MemoryError):  # Ray retries the batch; it is never filed as an error row
        emb(_embed_batch(rng, [good]))


@pytest.mark.slow
def test_huge_png_decodes():
    """A 6000x6000 PNG (no reduced decoding for PNG) still converts."""
    big = Image.new("RGB", (6000, 6000), (200, 30, 40))
    big.paste((10, 200, 30), (0, 0, 3000, 6000))
    img = decode_image(_encode(big, "PNG", compress_level=9))
    assert img.mode == "RGB" and img.size == (6000, 6000)


# ---------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("badimages") / "images"
    good, unusual, bad = build_folder(root)
    return root, good, unusual, bad


def test_bad_images_end_to_end(folder, tmp_path, tiny_models, ray_session, capsys):
    root, good, unusual, bad = folder
    total = len(good) + len(unusual) + len(bad)
    frac = len(bad) / total
    assert 0.02 < frac < 0.05  # ~3% bad
    cfg = write_config(tmp_path / "c.yaml", tiny_models[:2], data={"source": "images", "path": str(root)})
    run = tmp_path / "run"

    # 1. A stricter limit than the bad fraction: exit 1, one clear line, the errors table is still written.
    rc = cli.main(["optimize", "--config", str(cfg), "--out", str(run), "--max-error-fraction", "0.02"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("coopt:")]
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("coopt: run failed: ")
    assert f"{len(bad)} of {total} images" in err[0] and "max_error_fraction=0.02" in err[0]
    assert str(run / "errors") in err[0]
    errs = pq.read_table(run / "errors").to_pydict()
    assert dict(zip(errs["id"], errs["error"])).keys() == bad.keys()
    assert not (run / "manifest.json").exists() and not (run / "optimized").exists()
    marks = {p: (run / "embeddings" / p / DONE).stat().st_mtime_ns for p in ("p0", "p1")}

    # 2. Default limit (0.05) on the same --out: resumes (no participant is embedded again) and finishes.
    rc = cli.main(["optimize", "--config", str(cfg), "--out", str(run)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "p0: already done" in out and "p1: already done" in out
    assert {p: (run / "embeddings" / p / DONE).stat().st_mtime_ns for p in ("p0", "p1")} == marks
    man = json.loads((run / "manifest.json").read_text())
    opt = pq.read_table(run / "optimized").to_pydict()
    errs = pq.read_table(run / "errors").to_pydict()

    # Every good image (unusual modes included) is optimized, once; every bad one is an error, once.
    assert sorted(opt["id"]) == sorted(good + unusual)
    assert len(errs["id"]) == len(set(errs["id"])) == len(bad)
    for i, reason, stage in zip(errs["id"], errs["error"], errs["stage"]):
        assert reason.startswith(bad[i]), (i, reason)
        assert stage == "embed"
    assert set(errs["participant"]) <= {"p0", "p1"}
    # an image folder's partitions hold paths: each participant read only its own files' bytes
    assert man["split"]["read_fraction"] and set(man["split"]["bytes_read"]) == {"p0", "p1"}
    assert man["total_rows"] == total and man["error_rows"] == len(bad)
    assert man["optimized_rows"] + man["error_rows"] == man["total_rows"]
    assert sum(p["error_rows"] for p in man["participants"]) == len(bad)
    emb = pq.read_table(run / "embeddings" / "p0", columns=["id", "is_shared", "error"]).to_pydict()
    bad_shared = {i for i, sh, e in zip(emb["id"], emb["is_shared"], emb["error"]) if sh and e}
    assert man["shared_dropped"] == len(bad_shared) and not bad_shared & set(man["shared_ids"])

    # Unusual modes and the huge image carry real targets and their class labels.
    y = column_matrix(pq.read_table(run / "optimized", columns=["target"]).column("target"))
    assert np.isfinite(y).all()
    row = {i: k for k, i in enumerate(opt["id"])}
    u = np.stack([y[row[i]] for i in unusual])
    assert np.abs(u).sum(axis=1).min() > 0 and len({tuple(np.round(v, 5)) for v in u}) == len(unusual)
    for i in unusual + good[:10]:
        assert opt["label"][row[i]] == ["bag", "boot"].index(i.split("/")[0])
