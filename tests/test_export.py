"""`coopt export`: the trained student's backbone as timm safetensors + config.json and as ONNX, reloaded and
compared with the student itself on the same batch (within 1e-4); bad requests are one line and exit code 2.
No Ray: a tiny random-init student is written the way the train stage leaves RUN/student."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

ARCH = "resnet10t"
TOL = 1e-4


def _fake_student(run, image_size=32, head_dim=16, arch=ARCH):
    """RUN/student as the train stage leaves it, with a random-init student whose BatchNorm statistics are not
    the defaults (so a stem or norm layer left out of a load would show)."""
    from coopt_ray.student import Student

    out = run / "student"
    out.mkdir(parents=True)
    torch.manual_seed(1)
    student = Student(arch, image_size, head_dim)
    for m in student.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(student.state_dict(), out / "student.pt")
    (out / "metrics.json").write_text(json.dumps({"arch": arch, "image_size": image_size, "head_dim": head_dim,
                                                  "epochs": 1, "rows": 0, "history": []}))
    (out / "_DONE.json").write_text(json.dumps({"fingerprint": "fake", "final_loss": 0.0}))
    return out


def _batch(n, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _diff(model, ref, x) -> float:
    with torch.no_grad():
        return float((model.eval()(x) - ref.eval()(x)).abs().max())


def test_timm_export_reloads_with_the_students_features(tmp_path, capsys):
    import timm

    from coopt_ray.cli import main
    from coopt_ray.export import load_timm_backbone, stem_filter
    from coopt_ray.student import load_student_backbone

    run, out = tmp_path / "run", tmp_path / "exp"
    _fake_student(run)
    assert main(["export", "--run", str(run), "--out", str(out), "--format", "timm"]) == 0
    assert "[export] timm:" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == ARCH and cfg["num_classes"] == 0 and cfg["num_features"] == 512
    assert cfg["model_args"]["num_classes"] == 0
    assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32] and cfg["pretrained_cfg"]["mean"] == [0.5] * 3
    stem = cfg["coopt"]["stem"]
    assert stem["changed"] and stem["conv1"]["kernel_size"] == 3 and stem["conv1"]["stride"] == 1
    assert stem["maxpool"] == "Identity"
    backbone, _ = load_student_backbone(run / "student")
    x = _batch(6)

    # 1. the documented loader
    model = load_timm_backbone(out)
    assert _diff(model, backbone, x) < TOL
    assert timm.data.resolve_data_config(model=model)["input_size"] == (3, 32, 32)
    with torch.no_grad():
        assert load_timm_backbone(out, num_classes=10)(x).shape == (6, 10)  # a fresh head to fine-tune

    # 2. plain timm with the overlay and the stem filter, strict (num_classes=0 in the overlay too) ...
    weights = str(out / "model.safetensors")
    model = timm.create_model(ARCH, pretrained=True, num_classes=0, pretrained_filter_fn=stem_filter,
                              pretrained_cfg_overlay=dict(file=weights, num_classes=0))
    assert _diff(model, backbone, x) < TOL
    # ... and through timm's local-dir: source, which reads config.json's architecture and model_args
    model = timm.create_model(f"local-dir:{out}", pretrained=True, pretrained_filter_fn=stem_filter)
    assert _diff(model, backbone, x) < TOL

    # 3. without the filter timm builds its ImageNet stem: a strict load fails on the stem's keys, and the
    #    non-strict one (num_classes=0 only on create_model) loads but computes other features (README's warning)
    with pytest.raises(RuntimeError, match="conv1"):
        timm.create_model(ARCH, pretrained=True, num_classes=0,
                          pretrained_cfg_overlay=dict(file=weights, num_classes=0))
    model = timm.create_model(ARCH, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=weights))
    assert _diff(model, backbone, x) > 1e-2


def test_timm_export_without_a_stem_change_loads_in_plain_timm(tmp_path):
    import timm

    from coopt_ray.export import export_student
    from coopt_ray.student import load_student_backbone

    run, out = tmp_path / "run", tmp_path / "exp"
    _fake_student(run, image_size=72)  # > 64 px: timm's own stem
    export_student(run, out, "timm")
    assert json.loads((out / "config.json").read_text())["coopt"]["stem"] == {"changed": False}
    backbone, _ = load_student_backbone(run)
    x = _batch(3, 72)
    model = timm.create_model(ARCH, pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=0))
    assert _diff(model, backbone, x) < TOL


def _onnx_run(path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixel_values": x.numpy()})[0]


@pytest.mark.parametrize("with_head", [False, True], ids=["backbone", "with-head"])
def test_onnx_export_matches_in_onnxruntime_at_any_batch_size(tmp_path, with_head):
    import onnx

    from coopt_ray.cli import main
    from coopt_ray.student import load_student

    run, out = tmp_path / "run", tmp_path / "exp"
    _fake_student(run)
    argv = ["export", "--run", str(run), "--out", str(out), "--format", "onnx"] + (["--with-head"] if with_head else [])
    assert main(argv) == 0
    info = json.loads((out / "onnx.json").read_text())
    assert info["with_head"] is with_head and info["output_shape"] == ["batch", 16 if with_head else 512]
    dims = onnx.load(str(out / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]  # the batch axis is symbolic
    student, _ = load_student(run)
    net = student if with_head else student.backbone
    for n in (2, 5, 1):  # 2 is the batch it was traced at
        x = _batch(n, seed=n)
        with torch.no_grad():
            want = net(x).numpy()
        got = _onnx_run(out / "model.onnx", x)
        assert got.shape == want.shape and float(np.abs(got - want).max()) < TOL, n


def test_bad_export_requests_are_one_line_and_exit_2(tmp_path, capsys):
    from coopt_ray.cli import main
    from coopt_ray.export import ExportError, export_student

    run = tmp_path / "run"
    run.mkdir()
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "x"), "--format", "timm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("coopt: export error: no trained student")
    assert "coopt train" in err and not (tmp_path / "x").exists()

    with pytest.raises(SystemExit) as e:
        main(["export", "--run", str(run), "--out", str(tmp_path / "x"), "--format", "keras"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "invalid choice: 'keras'" in err
    with pytest.raises(ExportError, match="unknown export format 'keras'"):
        export_student(run, tmp_path / "x", "keras")

    _fake_student(run)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "x"), "--format", "timm", "--with-head"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--with-head applies to --format onnx" in err
    (tmp_path / "file").write_text("")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "file"), "--format", "timm"]) == 2
    assert "is a file" in capsys.readouterr().err
    (run / "student" / "student.pt").write_bytes(b"not a state dict")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "x"), "--format", "timm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("coopt: export error: cannot load the student of")
