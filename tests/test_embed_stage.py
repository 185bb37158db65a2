"""The embed stage's input path (issue 26, item 5): the CPU decode stage hands the participant actors fixed-shape
uint8 batches at the model's input size, with unreadable images as error rows; the preprocessing comes from the
model's config (no weights on the driver) and equals the model's own preprocess; the actor embeds under
inference_mode with bf16 autocast when asked (exercised here on the CPU)."""
from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from coopt_ray.config import ConfigError, parse_config
from coopt_ray.images import decode_image
from coopt_ray.models import load_model, save_local_dir
from coopt_ray.preprocess import (PIXELS, decode_batch, norm_tensors, params_of_loaded, preprocess_params,
                                  to_model_input)

from conftest import tiny_clip_cfg

# Our pixels come from the very PIL steps of open_clip's eval transform (resize, crop or pad) and the
# normalisation repeats ToTensor + Normalize's float32 operations, so the two paths agree to float rounding.
# Pinned at 1e-5 (not the 1e-2 a different resize would need): any drift means the paths diverged.
TOL = 1e-5


def _png(a: np.ndarray, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _images(rng) -> list[bytes]:
    """Readable images of assorted sizes and modes (gray 28x28 like Fashion-MNIST, non-square RGB, RGBA, JPEG)."""
    return [
        _png(rng.integers(0, 256, (28, 28), dtype=np.uint8)),
        _png(rng.integers(0, 256, (20, 45, 3), dtype=np.uint8)),
        _png(rng.integers(0, 256, (50, 31, 4), dtype=np.uint8)),
        _jpeg(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
    ]


def _batch(images: list, owned=None, read_error=None) -> dict:
    n = len(images)
    b = {"id": np.array([f"x{i}" for i in range(n)], dtype=object), "image": np.array(images, dtype=object),
         "owned": np.ones(n, bool) if owned is None else np.asarray(owned, bool), "is_shared": np.zeros(n, bool),
         "label": np.arange(n, dtype=np.int64)}
    if read_error is not None:
        b["read_error"] = np.array(read_error, dtype=object)
    return b


def _tiny(tmp_path, name: str, preprocess_cfg: dict, image_size=32, embed_dim=16) -> str:
    torch.manual_seed(0)
    import open_clip

    cfg = tiny_clip_cfg(embed_dim)
    cfg["vision_cfg"]["image_size"] = image_size
    save_local_dir(open_clip.CLIP(**cfg), cfg, tmp_path / name, preprocess_cfg)
    return f"local-dir:{tmp_path / name}"


# ---------------------------------------------------------------- the decode stage
def test_decode_stage_gives_uint8_at_the_model_size_and_error_rows(tiny_models, monkeypatch):
    rng = np.random.default_rng(0)
    good = _images(rng)
    png = good[1]
    batch = _batch(good + [png[: len(png) // 2], b"", b"not an image", png, png],
                   owned=[1, 1, 1, 1, 1, 1, 1, 1, 0],
                   read_error=["", "", "", "", "", "", "", "cannot read file: Permission denied", ""])
    params = preprocess_params(tiny_models[0])
    assert params["size"] == [32, 32]
    out = decode_batch(batch, params)
    n = len(batch["id"])
    assert out[PIXELS].shape == (n, 32, 32, 3) and out[PIXELS].dtype == np.uint8
    errors = list(out["error"])
    assert errors[:4] == [""] * 4 and errors[-1] == ""
    assert errors[4].startswith("unreadable image: image file is truncated")
    assert errors[5] == "empty file (0 bytes)" and errors[6] == "not a recognised image format"
    assert errors[7] == "cannot read file: Permission denied"  # the read's reason is kept, not overwritten
    assert not out[PIXELS][4:8].any() and all(out[PIXELS][i].std() > 0 for i in (0, 1, 3, 8))
    # Every row flows on (nothing lost); only the owner's copy of the bytes goes to the optimized set.
    assert list(out["id"]) == list(batch["id"]) and list(out["label"]) == list(range(n))
    assert out["image"][0] == good[0] and out["image"][8] == b""

    def broken(_data):  # a bug or an out-of-memory error is not a bad image: the batch fails loudly
        raise MemoryError("no memory left")

    monkeypatch.setattr("coopt_ray.preprocess.decode_image", broken)
    with pytest.raises(MemoryError):
        decode_batch(_batch([png]), params)


# ---------------------------------------------------------------- equal to the model's own preprocess
@pytest.mark.parametrize("pp", [
    {"mean": [0.5] * 3, "std": [0.5] * 3},                                           # shortest side, bicubic
    {"resize_mode": "squash", "interpolation": "bilinear", "mean": [0.4, 0.45, 0.5], "std": [0.2, 0.25, 0.3]},
    {"resize_mode": "longest", "fill_color": 0},                                     # OpenAI mean/std defaults
], ids=["shortest", "squash", "longest"])
def test_decode_and_normalise_equal_open_clip_preprocess(tmp_path, pp):
    model = _tiny(tmp_path, "m", pp, image_size=40)
    params = preprocess_params(model)  # read from the folder's config, no weights loaded
    m, preprocess, _ = load_model(model, device="cpu")
    assert params == params_of_loaded(m)  # what the loaded model's preprocess really uses
    images = _images(np.random.default_rng(1))
    out = decode_batch(_batch(images), params)
    mean, std = norm_tensors(params, "cpu")
    ours = to_model_input(torch.from_numpy(out[PIXELS]), mean, std)
    ref = torch.stack([preprocess(decode_image(b)) for b in images])
    assert ours.shape == ref.shape == (len(images), 3, 40, 40) and ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() < TOL


@pytest.mark.parametrize("size", [(32, 32), (40, 40), (24, 36), (36, 24)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode,interp,fill", [("shortest", "bicubic", 0), ("shortest", "bilinear", 0),
                                              ("squash", "bilinear", 0), ("squash", "bicubic", 0),
                                              ("longest", "bicubic", 0), ("longest", "bilinear", 200)])
def test_pil_resize_and_crop_equal_open_clips_transform_pixel_for_pixel(size, mode, interp, fill):
    """images.open_clip_eval_steps (what the decode tasks run, without open_clip) against open_clip's own eval
    transform up to its ToTensor: the same uint8 pixels, for square and non-square sizes (shortest: bicubic whatever
    the interpolation when non-square, as open_clip does), images smaller, larger and of other aspect than the
    size (padding with the fill colour, crops with odd remainders)."""
    from open_clip.transform import image_transform

    from coopt_ray.images import open_clip_eval_steps

    tf = image_transform(size, is_train=False, resize_mode=mode, interpolation=interp, fill_color=fill)
    steps = tf.transforms[:[type(t).__name__ for t in tf.transforms].index("MaybeToTensor")]
    ours = open_clip_eval_steps(list(size), mode, interp, fill)
    rng = np.random.default_rng(3)
    for h, w in [(28, 28), (20, 45), (45, 20), (17, 61), (64, 64), (9, 9), (33, 32), (101, 37)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = img
        for t in steps:
            ref = t(ref)
        got = np.asarray(ours(img))
        assert got.shape == (size[0], size[1], 3) and np.array_equal(got, np.asarray(ref)), (h, w)
    with pytest.raises(ValueError, match="resize_mode"):
        open_clip_eval_steps([32, 32], "crop")


@pytest.mark.parametrize("family", ["open_clip", "hf"])
def test_decode_task_imports_neither_torch_nor_open_clip(tmp_path, family):
    """The decode stage of an open_clip or a transformers participant runs in a fresh process without importing
    torch, open_clip or transformers (a Ray Data task worker pays for none of them; the actors that embed do)."""
    import subprocess
    import sys

    if family == "open_clip":
        params = preprocess_params(_tiny(tmp_path, "m", {"mean": [0.5] * 3, "std": [0.5] * 3}, image_size=40))
    else:  # a ViT image processor's settings (shortest edge 44, centre crop 40) as the hf participant reads them
        from coopt_ray.families import hf_plain

        params = hf_plain({"do_resize": True, "size": {"shortest_edge": 44}, "do_center_crop": True,
                           "crop_size": {"height": 40, "width": 40}, "resample": 3,
                           "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    code = ("import json, sys, numpy as np\n"
            "from coopt_ray.preprocess import decode_batch\n"
            "from coopt_ray.images import encode_png\n"
            "png = encode_png(np.full((28, 28), 7, dtype=np.uint8))\n"
            "b = {'id': np.array(['a'], dtype=object), 'image': np.array([png], dtype=object),\n"
            "     'is_shared': np.array([False]), 'owned': np.array([True]), 'label': np.array([0])}\n"
            "out = decode_batch(b, json.loads(sys.argv[1]))\n"
            "print(out['pixels'].shape, sorted(m for m in ('torch', 'open_clip', 'torchvision', 'transformers', 'timm')\n"
            "                                  if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(params)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "(1, 40, 40, 3) []", r.stdout


def test_open_clip_preprocess_defaults_and_merge_are_open_clips_own():
    """preprocess.OPEN_CLIP_PREPROCESS is a copy of open_clip's PreprocessCfg defaults (a driver reads local-dir:
    folders without importing open_clip), and its merge is open_clip's merge_preprocess_dict."""
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    from coopt_ray.preprocess import OPEN_CLIP_PREPROCESS, open_clip_preprocess_cfg

    assert OPEN_CLIP_PREPROCESS == asdict(PreprocessCfg())
    for overlay in (None, {}, {"mean": [0.5] * 3, "std": None, "resize_mode": "squash"},
                    {"interpolation": "bilinear", "size": 40, "unknown_key": 1, "fill_color": 255}):
        assert open_clip_preprocess_cfg(overlay) == merge_preprocess_dict(PreprocessCfg(), overlay or {}), overlay


def test_local_dir_params_resolve_without_importing_open_clip(tmp_path):
    """A driver reads a local-dir: participant's preprocessing from its folder in a fresh process without importing
    open_clip (whose import also pulls in torchvision and transformers): the same params as in this process."""
    import subprocess
    import sys

    model = _tiny(tmp_path, "m", {"resize_mode": "longest", "interpolation": "bilinear"}, image_size=40)
    code = ("import json, sys\n"
            "from coopt_ray.preprocess import preprocess_params\n"
            "p = preprocess_params(sys.argv[1])\n"
            "print(json.dumps([p, sorted(m for m in ('open_clip', 'torchvision', 'transformers') if m in sys.modules)]))\n")
    r = subprocess.run([sys.executable, "-c", code, model], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    params, imported = json.loads(r.stdout)
    assert params == preprocess_params(model) and params["size"] == [40, 40] and imported == []


def test_student_participant_params_match_its_input_path(tmp_path):
    from coopt_ray.student import METRICS, WEIGHTS, Student

    torch.manual_seed(0)
    s = Student("convnet3_w16", 32, 8).eval()
    (tmp_path / "run" / "student").mkdir(parents=True)
    torch.save(s.state_dict(), tmp_path / "run" / "student" / WEIGHTS)
    (tmp_path / "run" / "student" / METRICS).write_text(json.dumps({"arch": "convnet3_w16", "image_size": 32,
                                                                    "head_dim": 8}))
    spec = f"student:{tmp_path / 'run'}"
    params = preprocess_params(spec)
    _, preprocess, _ = load_model(spec, device="cpu")
    images = _images(np.random.default_rng(2))
    mean, std = norm_tensors(params, "cpu")
    ours = to_model_input(torch.from_numpy(decode_batch(_batch(images), params)[PIXELS]), mean, std)
    ref = torch.stack([preprocess(decode_image(b)) for b in images])
    assert (ours - ref).abs().max().item() < TOL


def test_hub_names_take_the_pretrained_tags_preprocessing_without_weights():
    import open_clip
    from open_clip.constants import IMAGENET_MEAN

    p = preprocess_params("ViT-B-32", "laion2b_s34b_b79k")
    assert p["size"] == [224, 224] and p["resize_mode"] == "shortest" and p["interpolation"] == "bicubic"
    assert p["mean"] == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    clipa = next((m, t) for m, t in open_clip.list_pretrained() if "CLIPA" in m)
    q = preprocess_params(*clipa)
    assert q["resize_mode"] == "squash" and q["interpolation"] == "bilinear"
    assert q["mean"] == pytest.approx(IMAGENET_MEAN)
    assert preprocess_params("RN50")["size"] == [224, 224]  # no tag: open_clip's defaults


# ---------------------------------------------------------------- the actor
def test_actor_embeds_decoded_batches_fp32_unchanged_and_bf16_close(tiny_models):
    from coopt_ray.optimize import ParticipantEmbedder

    rng = np.random.default_rng(3)
    images = _images(rng) * 4
    params = preprocess_params(tiny_models[2])
    batch = decode_batch(_batch(images + [b""]), params)
    fp32 = ParticipantEmbedder(tiny_models[2], None, use_gpu=False, params=params)  # amp auto: fp32 on the CPU
    bf16 = ParticipantEmbedder(tiny_models[2], None, use_gpu=False, amp="bf16", params=params)
    a, b = fp32(batch), bf16(batch)
    assert set(a) == {"id", "embedding", "is_shared", "owned", "error", "image", "label"}
    assert a["embedding"].dtype == b["embedding"].dtype == np.float32 and a["embedding"].shape == (17, 32)
    assert list(a["error"])[-1] == "empty file (0 bytes)" and not a["embedding"][-1].any()
    # CPU results do not move: fp32 equals the model on open_clip's own preprocess, image by image.
    with torch.no_grad():
        ref = fp32.model.encode_image(torch.stack([fp32.preprocess(decode_image(x))
                                                   for x in images])).numpy()
    np.testing.assert_allclose(a["embedding"][:16], ref, atol=1e-5)
    # The bf16 autocast path really ran (not bit-equal) and stays close.
    x, y = a["embedding"][:16], b["embedding"][:16]
    assert not np.array_equal(x, y)
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert cos.min() > 0.99
    # Raw rows (a direct call, not the pipeline) are decoded the same way first.
    np.testing.assert_array_equal(fp32(_batch(images + [b""]))["embedding"], a["embedding"])


def test_actor_refuses_params_that_differ_from_the_loaded_model(tiny_models):
    from coopt_ray.optimize import ParticipantEmbedder

    params = dict(preprocess_params(tiny_models[0]), size=[64, 64])
    with pytest.raises(RuntimeError, match="differs from the loaded model"):
        ParticipantEmbedder(tiny_models[0], None, use_gpu=False, params=params)


# ---------------------------------------------------------------- the pipeline's stages
def _split(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from coopt_ray.split import SPLIT_SCHEMA, Split

    for part, owner, shared in (("0", 0, False), ("S", 1, True)):
        (tmp_path / f"part={part}").mkdir(parents=True)
        t = pa.table({"id": [f"i{part}"], "image": [b""], "path": [""], "label": [0], "owner": [owner],
                      "shared": [shared]}, schema=SPLIT_SCHEMA)
        pq.write_table(t, tmp_path / f"part={part}" / "a.parquet")
    return Split(tmp_path, total=2, shared=1, rows={"0": 1, "S": 1}, bytes={}, source_bytes=0)


def test_decode_is_its_own_cpu_stage_before_a_gpu_pool(tmp_path, tiny_models, ray_session, capsys):
    """The physical plan (nothing runs): a GPU pool gets the decode stage's batches from CPU tasks; a CPU pool
    asking the same resources has Ray Data fuse the decode into its actors, unless decode_cpus differs."""
    from coopt_ray.optimize import embed_dataset

    cfg = parse_config({"participants": [
        {"name": "g", "model": tiny_models[0], "num_gpus": 0.25},
        {"name": "c", "model": tiny_models[0]},
        {"name": "s", "model": tiny_models[0], "decode_cpus": 0.5}]})
    split = _split(tmp_path / "source")
    plans = {}
    for i, p in enumerate(cfg.participants):
        embed_dataset(cfg, i, split).explain()
        plans[p.name] = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    for name in ("g", "s"):
        assert re.search(r"\+- TaskPoolMapOperator\[[^\]]*MapBatches\(decode_batch\)\]", plans[name]), plans[name]
        assert f"ActorPoolMapOperator[MapBatches(Participant_{name})]" in plans[name]
    assert "ActorPoolMapOperator[MapBatches(participant_rows)->MapBatches(decode_batch)->MapBatches(Participant_c)]" \
        in plans["c"]


# ---------------------------------------------------------------- config keys
def _raw(**p):
    return {"participants": [{"name": "p0", "model": "local-dir:x", **p}]}


@pytest.mark.parametrize("key,value", [("amp", "fp16"), ("decode_cpus", 0)])
def test_bad_embed_keys_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"participants\[0\]\.{key}"):
        parse_config(_raw(**{key: value}))


def test_embed_keys_leave_old_fingerprints_alone():
    base = parse_config(_raw())
    assert parse_config(_raw(amp="auto", decode_cpus=4)).fingerprint("participants") == base.fingerprint("participants")
    assert "amp" not in base.fingerprint_view()["participants"][0]
    assert parse_config(_raw(amp="bf16")).fingerprint("participants") != base.fingerprint("participants")
