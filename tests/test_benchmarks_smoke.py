"""Smoke test for the benchmark pieces: every method trains one tiny epoch and the summary is complete."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_methods_train_and_summarise():
    import fidelity

    from coopt_ray import baselines as B

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(32) % 4
    targets = rng.normal(size=(32, 8)).astype(np.float32)
    probe = B.Prober(images[:16], labels[:16], images[16:], labels[16:], epochs=2)
    kw = dict(epochs=1, batch_size=16, probe=probe, log=lambda m: None)
    runs = {
        "coopt": B.train_coopt("test_vit", images, targets, **kw)[1],
        "byol": B.train_byol("test_vit", images, **kw)[1],
        "simclr": B.train_simclr("test_vit", images, **kw)[1],
        "supervised": B.train_supervised("test_vit", images, labels, **kw)[1],
        # an ablation: probed after its last epoch only
        "noalign": B.train_coopt("test_vit", images, targets, **{**kw, "probe": fidelity.FinalProbe(probe, 1)})[1],
    }
    own = rng.normal(size=(32, 2, 6)).astype(np.float32)
    own[:16, 1, 4:] = 0  # participant 1 is 4 wide
    train = np.zeros((32, 2), bool)
    train[:16, 0] = train[16:, 1] = True
    train[:4] = True  # S: both participants embedded it
    heads = {"names": ["a", "b"], "dims": [6, 4], "own": own, "train": train, "stats": train, "aligned": True}
    runs["heads_both"] = B.train_coopt("test_vit", images, targets, heads=heads, **kw)[1]
    assert runs["noalign"][0]["probe_accuracy"] is None and runs["noalign"][-1]["probe_accuracy"] is not None
    for hist in runs.values():
        assert [h["epoch"] for h in hist] == [0, 1]
        assert 0.0 <= hist[-1]["probe_accuracy"] <= 1.0 and np.isfinite(hist[-1]["loss"])
    res = fidelity.summarise({"runs": {k: {"0": h} for k, h in runs.items()}}, None)
    for k in runs:
        assert set(res[k]) == {"mean", "std", "n"}
    assert set(res["time_to_byol_final"]) >= {"byol", "coopt", "byol_final_accuracy"}
    assert "coopt_minus_byol_points" in res["goals"]
    assert "coopt" in res["curves"] and "noalign" not in res["curves"]


def test_make_synthetic_writes_sources_the_pipeline_reads(tmp_path, ray_session):
    import make_synthetic as MS

    from coopt_ray.config import DataConfig
    from coopt_ray.data import count_images
    from coopt_ray.images import decode_image

    for fmt in ("parquet", "webdataset"):
        r = MS.make_synthetic(50, tmp_path / fmt, fmt, shards=3, seed=1)
        assert r["images"] == 50 and r["shards"] == 3 and r["bytes"] > 0
        assert count_images(DataConfig(source=fmt, path=str(tmp_path / fmt))) == 50
    a, la = MS.make_image(7, 1, *MS._base_images())
    b, _ = MS.make_image(8, 1, *MS._base_images())
    assert a != b and a == MS.make_image(7, 1, *MS._base_images())[0] and 0 <= la < 10
    assert decode_image(a).size == (28, 28)


@pytest.mark.slow
def test_labeled_distillation_benchmark_quick_protocol_writes_its_json(tmp_path, ray_session):
    import distill_labeled as DL
    from report_labeled import labeled_goal_rows, labeled_table

    r = DL.main(["--quick", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "res")])
    assert (tmp_path / "res" / "distill_labeled_quick.json").exists() and (tmp_path / "res" / "distill_labeled_quick.png").exists()
    for i in ("1", "10"):
        v = r["ipc"][i]
        assert len(v["mdatm"]["runs"]) == len(v["random"]["runs"]) == len(v["init"]["runs"]) == 2
        assert v["gain_points"] == round(100 * (v["mdatm"]["mean"] - v["random"]["mean"]), 2)
    assert r["expert_speedup"]["speedup"] > 0 and r["expert_speedup"]["projection_gpus"][2] == 2.0
    rows = []
    labeled_goal_rows(r, lambda *a: rows.append(a))
    assert len(rows) == 2 and "IPC 1" in labeled_table(r)


def test_proc_cpu_names_ray_titles_and_counts_a_busy_child(tmp_path):
    import proc_cpu

    assert proc_cpu.kind("ray::RayTrainWorker.__init__") == "ray::RayTrainWorker.init"  # ids and underscores go
    assert proc_cpu.kind("ray::_fetch_parquet_file_info") == proc_cpu.kind("ray::_fetch_parquet_file_info_2")
    assert proc_cpu.kind("/x/bin/raylet --node_id=ab12") == "raylet"
    out = tmp_path / "procs.md"
    # a child that burns about 1 s of CPU shows up as its own kind, with at least most of that second
    busy = "import time; t = time.process_time()\nwhile time.process_time() - t < 1.0: pass"
    assert proc_cpu.main(["--out", str(out), "--", sys.executable, "-c", busy]) == 0
    row = next(ln for ln in out.read_text().splitlines() if ln.startswith("|") and "import time" in ln)
    assert float(row.split("|")[1]) >= 0.7, row


def test_proc_cpu_keeps_a_childs_command_line_once_it_is_a_zombie():
    """An exited child that is not reaped yet has an empty /proc cmdline; the last sample of a short command often
    sees it so (CI once named the whole command ``[python]``). Its command line and CPU must survive that sample."""
    import proc_cpu
    from conftest import _stat

    tick, me = os.sysconf("SC_CLK_TCK"), os.getpid()
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read(); x = sum(range(3_000_000))"],
                             stdin=subprocess.PIPE)
    try:
        seen: dict = {}
        proc_cpu.sample(seen, me, tick)  # alive, blocked on stdin: its command line is readable
        assert "sys.stdin.read()" in seen[str(child.pid)][1]
        child.stdin.close()
        deadline = time.monotonic() + 30
        while _stat(child.pid)[0] != "Z":  # exited, not reaped: a zombie
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.02)
        assert Path(f"/proc/{child.pid}/cmdline").read_text() == ""
        proc_cpu.sample(seen, me, tick)
        cpu, cmd = seen[str(child.pid)]
        assert "sys.stdin.read()" in cmd and cpu > 0, (cpu, cmd)
    finally:
        child.wait()


def test_read_rows_gives_each_column_as_arrays_and_only_the_asked_ids_in_order(tmp_path):
    """benchmarks/common.read_rows, which distill.py and krr_signal.py read their row sets with."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from common import read_rows

    from coopt_ray.images import encode_png

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    targets = rng.normal(size=(5, 3)).astype(np.float32)
    ids = [f"r{k}" for k in range(5)]
    pq.write_table(pa.table({"id": ids, "image": [encode_png(a) for a in imgs],
                             "target": [list(map(float, t)) for t in targets], "label": [3, 1, 4, 1, 5],
                             "init_id": [f"i{k}" for k in range(5)]}), tmp_path / "part-0.parquet")
    every = read_rows(tmp_path)
    assert list(every) == ["id", "image", "target"] and every["id"] == ids
    assert every["image"].dtype == np.uint8 and np.array_equal(every["image"], imgs)  # PNG is lossless at 32 px
    assert np.array_equal(every["target"], targets)
    some = read_rows(tmp_path, ["r3", "r0"], columns=("id", "image", "target", "label", "init_id"))
    assert some["id"] == ["r3", "r0"] and some["init_id"] == ["i3", "i0"]
    assert isinstance(some["label"], np.ndarray) and some["label"].tolist() == [1, 3]
    assert np.array_equal(some["image"], imgs[[3, 0]]) and np.array_equal(some["target"], targets[[3, 0]])
