"""Participants of any family (issue 28): timm: and hf: models next to open_clip, on tiny models these tests build
and save (timm with pretrained=False as safetensors, transformers from a tiny config with save_pretrained); their
own preprocessing, the pool key, one run mixing all three, and preflight refusing hub weights it cannot get."""
import io
import socket
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from coopt_ray import hub, models
from coopt_ray.config import ConfigError, load_config
from coopt_ray.embeddings import column_matrix
from coopt_ray.preprocess import decode_batch, norm_tensors, params_of_loaded, preprocess_params, to_model_input
from coopt_ray.preflight import check_paths

from conftest import cli_errors, forbid_ray_start, write_config


# ---------------------------------------------------------------- tiny models, built and saved here
def save_timm(path, arch="test_vit"):
    """A random-init timm model (pretrained=False) saved as safetensors; ``timm:<arch>`` + this file loads it."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


def save_hf(folder, kind="dinov2"):
    """A tiny transformers vision model + its image processor, saved with save_pretrained."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model, ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    if kind == "dinov2":  # shortest edge 36 -> centre crop 32, bicubic, pooled output (layer-normed CLS), 48-d
        net = Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=1,
                                       num_attention_heads=2, mlp_ratio=2))
        proc = BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                 do_center_crop=True)
    else:  # squash to 32x32, bilinear, CLS token by default, 32-d
        net = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64))
        proc = ViTImageProcessor(size={"height": 32, "width": 32})
    net.save_pretrained(folder)
    proc.save_pretrained(folder)
    return f"hf:{folder}"


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {"timm_file": save_timm(root / "test_vit.safetensors"),
            "resnet_file": save_timm(root / "test_resnet.safetensors", "test_resnet"),
            "dino": save_hf(root / "dino", "dinov2"), "vit": save_hf(root / "vit", "vit")}


def png(w, h, seed=0):
    """A noisy, non-square RGB image as PNG bytes (odd sizes exercise the crop offsets)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def ours(model, pretrained, data):
    """Our path: the config-derived dict -> the decode stage (uint8 at the input size) -> to_model_input."""
    params = preprocess_params(model, pretrained)
    batch = {"id": np.array(["a"]), "image": np.array([data], dtype=object), "owned": np.array([True]),
             "is_shared": np.array([False]), "label": np.array([0])}
    out = decode_batch(batch, params)
    assert out["error"][0] == ""
    return to_model_input(torch.from_numpy(out["pixels"]), *norm_tensors(params, "cpu"))


# ---------------------------------------------------------------- preprocessing equals the family's own
def test_timm_preprocessing_equals_create_transform(fam):
    """timm's resolve_data_config + create_transform on the loaded model vs our decode path: the decode stage runs
    timm's own transform up to ToTensor and to_model_input does ToTensor + Normalize's operations in float32, so
    the numbers agree to float rounding (1e-6)."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    enc, _, dim = models.load_model("timm:test_vit", fam["timm_file"])
    assert dim == 64 and params_of_loaded(enc) == preprocess_params("timm:test_vit", fam["timm_file"])
    for w, h in ((45, 71), (200, 133)):
        data = png(w, h)
        ref = create_transform(**resolve_data_config({}, model=enc.net))(Image.open(io.BytesIO(data)).convert("RGB"))
        got = ours("timm:test_vit", fam["timm_file"], data)
        assert got.shape == (1, 3, 160, 160)
        assert (got[0] - ref).abs().max().item() < 1e-6


@pytest.mark.parametrize("kind", ["dino", "vit"])
def test_hf_preprocessing_equals_image_processor(fam, kind):
    """The folder's image processor (PIL backend: the resize/crop our decode stage reproduces) vs our decode path.
    It rescales and normalises in float64 then casts, we in float32: they differ by float32 rounding, pinned at
    1e-5. (The torchvision backend resizes tensors with its own antialiasing: not the same pixels, not pinned.)"""
    from PIL import Image
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(fam[kind][3:], backend="pil")
    for w, h in ((45, 71), (133, 40), (32, 32)):
        data = png(w, h, seed=w)
        ref = proc(images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt")["pixel_values"]
        got = ours(fam[kind], None, data)
        assert got.shape == ref.shape == (1, 3, 32, 32)
        assert (got - ref).abs().max().item() < 1e-5
    enc, pre, _ = models.load_model(fam[kind])  # the loaded model's own preprocess: the same pixels
    assert params_of_loaded(enc) == preprocess_params(fam[kind])
    img = Image.open(io.BytesIO(png(45, 71, seed=45))).convert("RGB")
    assert (pre(img) - proc(images=img, return_tensors="pt")["pixel_values"][0]).abs().max().item() < 1e-5


# ---------------------------------------------------------------- the pool key
def test_pool_picks_cls_or_pooled(fam):
    from transformers import AutoModel

    x = torch.randn(2, 3, 32, 32)
    ref = AutoModel.from_pretrained(fam["vit"][3:]).eval()(pixel_values=x)
    emb = {p: models.load_model(fam["vit"], pool=p)[0].encode_image(x).detach() for p in ("auto", "cls", "pooled",
                                                                                          "mean")}
    torch.testing.assert_close(emb["auto"], ref.last_hidden_state[:, 0])  # ViTModel: auto is the CLS token
    torch.testing.assert_close(emb["cls"], ref.last_hidden_state[:, 0])
    torch.testing.assert_close(emb["pooled"], ref.pooler_output)          # its dense+tanh pooler
    torch.testing.assert_close(emb["mean"], ref.last_hidden_state[:, 1:].mean(1))
    assert not torch.allclose(emb["cls"], emb["pooled"])
    dino = AutoModel.from_pretrained(fam["dino"][3:]).eval()(pixel_values=x)
    torch.testing.assert_close(models.load_model(fam["dino"])[0].encode_image(x).detach(), dino.pooler_output)

    xt = torch.randn(2, 3, 160, 160)
    t = {p: models.load_model("timm:test_vit", fam["timm_file"], pool=p)[0] for p in ("auto", "cls", "mean")}
    feats = t["cls"].net.forward_features(xt).detach()
    torch.testing.assert_close(t["cls"].encode_image(xt).detach(), feats[:, 0])
    torch.testing.assert_close(t["mean"].encode_image(xt).detach(), feats[:, t["mean"].net.num_prefix_tokens:].mean(1))
    torch.testing.assert_close(t["auto"].encode_image(xt).detach(), t["auto"].net(xt).detach())  # forward_head


def _cfg(tmp_path, parts, **over):
    p = write_config(tmp_path / "c.yaml", [m for m, _ in parts], **over)
    raw = yaml.safe_load(p.read_text())
    for entry, (_, extra) in zip(raw["participants"], parts):
        entry.update(extra)
    p.write_text(yaml.safe_dump(raw))
    return p


def test_bad_pool_names_the_key(fam, tiny_models, tmp_path, monkeypatch):
    forbid_ray_start(monkeypatch)
    for extra, model, want in (({"pool": "max"}, "timm:test_vit", "must be one of"),
                               ({"pool": "cls"}, tiny_models[0], "needs a timm: or hf: model")):
        with pytest.raises(ConfigError, match=r"'participants\[1\]\.pool'.*" + want):
            load_config(_cfg(tmp_path, [(tiny_models[0], {}), (model, {"pretrained": fam["timm_file"], **extra})]))
    extra = {"pool": "cls", "pretrained": fam["resnet_file"]}  # a CNN has no class token
    cfg = _cfg(tmp_path, [(tiny_models[0], {}), ("timm:test_resnet", extra)])
    rc, err = cli_errors(["optimize", "--config", cfg, "--out", tmp_path / "run"])
    assert rc == 2 and len(err) == 1 and "'participants[1].pool'" in err[0] and "class token" in err[0], err


def test_spec_errors_are_one_line(fam, tiny_models, tmp_path, monkeypatch):
    forbid_ray_start(monkeypatch)
    cases = [(("timm:test_vit", {"pretrained": "nope"}), "r160_in1k"),
             (("timm:not_a_net", {}), "unknown timm architecture"),
             (("timm:test_vit", {"pretrained": str(tmp_path / "absent.safetensors")}), "not found"),
             (("hf:" + str(tmp_path / "nofolder"), {}), "not found")]
    for (model, extra), want in cases:
        cfg = _cfg(tmp_path, [(tiny_models[0], {}), (model, extra)])
        rc, err = cli_errors(["optimize", "--config", cfg, "--out", tmp_path / "run"])
        assert rc == 2 and len(err) == 1 and "'participants[1]." in err[0] and want in err[0], err
    import importlib.util

    from coopt_ray import families

    real = importlib.util.find_spec
    monkeypatch.setattr(families.importlib.util, "find_spec", lambda n, *a: None if n == "transformers" else real(n, *a))
    cfg = _cfg(tmp_path, [(tiny_models[0], {}), (fam["vit"], {})])
    rc, err = cli_errors(["optimize", "--config", cfg, "--out", tmp_path / "run"])
    assert rc == 2 and len(err) == 1 and "coopt_ray[hf]" in err[0], err


# ---------------------------------------------------------------- preflight: hub weights that cannot be had
def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: a connection is refused at once
    return port


HUB = [("ViT-B-32", {"pretrained": "laion2b_s34b_b79k"}, "participants[1].pretrained", "laion2b_s34b_b79k"),
       ("timm:vit_small_patch14_dinov2", {"pretrained": "lvd142m"}, "participants[1].pretrained", "lvd142m"),
       ("hf:google/siglip-base-patch16-224", {}, "participants[1].model", "google/siglip-base-patch16-224")]


@pytest.mark.parametrize("offline", [False, True], ids=["closed-port", "HF_HUB_OFFLINE"])
@pytest.mark.parametrize("model,extra,key,tag", HUB, ids=["open_clip", "timm", "hf"])
def test_preflight_refuses_uncached_hub_weights(model, extra, key, tag, offline, tiny_models, tmp_path,
                                                monkeypatch):
    forbid_ray_start(monkeypatch)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(hub.os.path, "expanduser", lambda p: p.replace("~", str(tmp_path)))  # no url cache either
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    cfg = _cfg(tmp_path, [(tiny_models[0], {}), (model, extra)])
    t0 = time.time()
    rc, err = cli_errors(["optimize", "--config", cfg, "--out", tmp_path / "run"])
    assert time.time() - t0 < 15
    assert rc == 2 and len(err) == 1, err
    line = err[0]
    assert f"'{key}'" in line and "participant p1" in line and tag in line, line
    assert "pre-download" in line and "local-dir:" in line and "weights file" in line
    assert ("HF_HUB_OFFLINE=1" if offline else "hub unreachable") in line


def test_hub_cache_first_then_short_request(tmp_path, monkeypatch):
    """A file in the HF cache passes without any request; a hub that does not answer is given up on within the
    timeout."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo, files = hub.hub_needs("timm:vit_small_patch14_dinov2", "lvd142m")[0][1:]
    snap = tmp_path / f"models--{repo.replace('/', '--')}"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("abc")
    (snap / "snapshots" / "abc").mkdir(parents=True)
    (snap / "snapshots" / "abc" / files[0]).write_bytes(b"x")
    assert hub.hub_problem("timm:vit_small_patch14_dinov2", "lvd142m") is None
    assert "HF_HUB_OFFLINE=1" in hub.hub_problem("timm:vit_base_patch16_224", "augreg_in21k")
    with socket.socket() as silent:  # accepts connections (backlog) but never answers: the timeout decides
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        t0 = time.time()
        why = hub.probe_url(f"http://127.0.0.1:{silent.getsockname()[1]}/x", timeout=0.5)
    assert why and "unreachable within 0.5 s" in why and time.time() - t0 < 3, why


# ---------------------------------------------------------------- one run, three families
@pytest.mark.slow
def test_run_mixes_three_families(fam, tiny_models, tmp_path, ray_session):
    """open_clip (16-d), timm (64-d) and hf (48-d) participants in one optimize run: each embeds its shard and S
    in its own pool, all are scored, the others aligned to the best, and merged."""
    from coopt_ray.pipeline import run_optimize

    parts = [(tiny_models[0], {}), ("timm:test_vit", {"pretrained": fam["timm_file"]}), (fam["dino"], {})]
    cfg = load_config(_cfg(tmp_path, parts, data={"source": "fashion-mnist", "limit": 150},
                           shared={"fraction": 0.2, "min": 16}))
    check_paths(cfg)  # preflight passes: nothing to fetch from a hub
    man = run_optimize(cfg, tmp_path / "run", log=lambda *_: None)
    dims = {p["name"]: p["embed_dim"] for p in man["participants"]}
    assert dims == {"p0": 16, "p1": 64, "p2": 48}
    assert man["optimized_rows"] + man["error_rows"] == man["total_rows"] == 150
    assert sum(p["rows"] for p in man["participants"]) == 150
    assert all(np.isfinite(p["uniformity"]) for p in man["participants"])
    assert [p["aligned"] for p in man["participants"]] == [p["name"] != man["best"] for p in man["participants"]]
    y = column_matrix(pq.read_table(tmp_path / "run" / "optimized").column("target"))
    assert y.shape == (man["optimized_rows"], dims[man["best"]]) and np.all(np.isfinite(y))


def test_score_teacher_any_family(fam):
    """The evaluate stage's teacher probe (load_model + embed_arrays) runs timm: and hf: models as it runs open_clip."""
    from coopt_ray.evaluate import score_teacher

    rng = np.random.default_rng(0)
    data = {"probe_raw": rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), "probe_y": np.arange(40) % 4,
            "test_raw": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), "test_y": np.arange(20) % 4}
    for model, pre, dim in (("timm:test_vit", fam["timm_file"], 64), (fam["dino"], None, 48)):
        r = score_teacher(model, pre, data, epochs=2)
        assert r["embed_dim"] == dim and 0 <= r["probe_accuracy"] <= 1
