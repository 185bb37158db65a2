"""The hash split: owners and S are pure functions of each id (no global sort, no driver id list), and the split
stage writes RUN/source/ partitioned by owner plus S, which each participant reads alone."""
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coopt_ray.config import ConfigError, load_config
from coopt_ray.data import in_shared, owner_of, shared_size, shared_subset, shared_threshold, split

from conftest import write_config

IDS = [f"train/{i}" for i in range(5000)]


def test_split_disjoint_complete_reproducible():
    shards, s = split(IDS, 4, 0.0005, 16, seed=7)
    flat = [i for sh in shards for i in sh]
    assert sorted(flat) == sorted(IDS) and len(flat) == len(set(flat))
    assert all(700 < len(sh) < 1800 for sh in shards)
    again, s2 = split(IDS, 4, 0.0005, 16, seed=7)
    assert again == shards and s2 == s
    other, s3 = split(IDS, 4, 0.0005, 16, seed=8)
    assert other != shards and s3 != s


def test_shared_subset_is_a_threshold_with_the_expected_size():
    # |S| ~ Binomial(n, m/n): over 40 seeds the mean is m within 4 standard errors, each draw within 5 sigma.
    n, m = 5000, 50
    sizes = [len(shared_subset(IDS, 0.01, 16, seed=s)) for s in range(40)]
    sd = math.sqrt(m * (1 - m / n))
    assert shared_size(n, 0.01, 16) == m
    assert abs(np.mean(sizes) - m) < 4 * sd / math.sqrt(len(sizes)) and all(abs(v - m) < 5 * sd for v in sizes)
    s = shared_subset(IDS, 0.01, 16, seed=0)
    assert set(s) <= set(IDS) and len(set(s)) == len(s)
    # membership is per id: the same ids are in S whatever else is in the list, and whatever its order
    t = shared_threshold(n, 0.01, 16)
    assert np.array_equal(in_shared(IDS[:100], 0, t), in_shared(IDS[:100][::-1], 0, t)[::-1])
    assert {i for i, v in zip(IDS[:2500], in_shared(IDS[:2500], 0, t)) if v} == {i for i in s if i in set(IDS[:2500])}


def test_shared_subset_bigger_than_data_is_config_error():
    with pytest.raises(ConfigError, match="bigger than the data"):
        shared_subset(IDS[:10], 0.5, 16, seed=0)


def test_owner_depends_on_id_not_order():
    a = owner_of(IDS[:100], 3, 0)
    b = owner_of(IDS[:100][::-1], 3, 0)[::-1]
    assert np.array_equal(a, b)


def _read(d):
    return pq.read_table(d, columns=["id", "owner", "shared"]).to_pydict() if d.exists() else \
        {"id": [], "owner": [], "shared": []}


@pytest.mark.parametrize("source", ["parquet", "images"])
def test_split_stage_writes_owner_partitions_and_s(tmp_path, tiny_models, ray_session, source):
    """RUN/source/part=<k> holds exactly D(k) outside S and part=S exactly S (as the reference split says);
    together disjoint and complete; each participant's input is its partition and S's, and its bytes ratio is
    about 1/K + |S|/N."""
    from coopt_ray.split import participant_dataset, run_split
    from coopt_ray.images import encode_png

    n, k = 400, 3
    ids = [f"img/{i:04d}.png" for i in range(n)]
    rng = np.random.default_rng(0)
    pngs = [encode_png(rng.integers(0, 255, (16, 16), dtype=np.uint8)) for _ in range(n)]
    src = tmp_path / "src"
    if source == "parquet":
        src.mkdir()
        for j in range(4):  # 4 files of 100 rows
            sl = slice(100 * j, 100 * (j + 1))
            pq.write_table(pa.table({"id": ids[sl], "image": pngs[sl], "label": list(range(sl.start, sl.stop))}),
                           src / f"f{j}.parquet")
    else:
        for i, b in zip(ids, pngs):
            (src / i).parent.mkdir(parents=True, exist_ok=True)
            (src / i).write_bytes(b)
        ids = [i.split("/", 1)[1] for i in ids]  # folder ids are paths relative to data.path
        src = src / "img"
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_models[:1] * k, data={"source": source, "path": str(src), "limit": None},
                                   shared={"fraction": 0.05, "min": 16},
                                   participants=[{"name": f"p{j}", "model": tiny_models[0]} for j in range(k)]))
    logs = []
    sp = run_split(cfg, tmp_path / "run", log=logs.append)
    want_shards, want_s = split(ids, k, 0.05, 16, seed=cfg.seed)
    got_s = _read(sp.root / "part=S")
    assert sorted(got_s["id"]) == want_s and all(got_s["shared"]) and sp.shared == len(want_s)
    seen = list(got_s["id"])
    for j in range(k):
        part = _read(sp.root / f"part={j}")
        assert set(part["owner"]) <= {j} and not any(part["shared"])
        assert sorted(part["id"]) == sorted(set(want_shards[j]) - set(want_s))
        seen += part["id"]
    assert sorted(seen) == sorted(ids) and sp.total == n  # disjoint and complete
    # S is the same rows for every participant; each reads D(j) ∪ S with owned = (owner == j)
    for j in range(k):
        rows = participant_dataset(sp, j, name=f"t{j}").select_columns(["id", "owned", "is_shared"]).to_pandas()
        assert set(rows.loc[rows.is_shared, "id"]) == set(want_s)
        assert set(rows.loc[rows.owned, "id"]) == set(want_shards[j]) and len(rows) == len(set(rows.id))
        frac = sp.bytes_for(j) / sum(sp.bytes.values())
        assert abs(frac - (len(want_shards[j]) + len(want_s) * (1 - 1 / k)) / n) < 0.1
    again = run_split(cfg, tmp_path / "run", log=logs.append)
    assert again == sp and "already done" in logs[-1]


def test_split_stage_rejects_repeated_ids(tmp_path, tiny_models, ray_session):
    from coopt_ray.split import run_split
    from coopt_ray.images import encode_png

    png = encode_png(np.zeros((8, 8), np.uint8))
    src = tmp_path / "src"
    src.mkdir()
    for j in range(2):
        pq.write_table(pa.table({"id": [f"a{i}" for i in range(30)], "image": [png] * 30}), src / f"f{j}.parquet")
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_models[:2], data={"source": "parquet", "path": str(src), "limit": None},
                                   shared={"fraction": 0.2, "min": 4}))
    with pytest.raises(ConfigError, match=r"ids in .* are not unique \('a\d+' occurs more than once\)"):
        run_split(cfg, tmp_path / "run", log=lambda s: None)


def test_hash_outputs_are_pinned():
    """Known answers: a changed salt, shift or digest would silently move every existing run's shards, S and
    student subset, so these values are frozen (computed once from blake2b-64 of "<salt>:<id>")."""
    from coopt_ray.data import in_shared, owner_of, unit_hash
    from coopt_ray.rows import _student_hash, subset_ids

    ids = ["train/10000", "train/10001", "train/12345", "cat/img_7.png", "a"]
    assert owner_of(ids, 4, 0).tolist() == [1, 0, 1, 3, 3]
    assert owner_of(ids, 3, 7).tolist() == [2, 0, 2, 2, 0]
    assert owner_of(ids, 3, 0, shares=[1, 2, 0]).tolist() == [1, 1, 1, 0, 0]
    np.testing.assert_array_equal(unit_hash(ids, "shared:0"), [0.45833997256700454, 0.9823091776151067,
                                                                0.15059917293629932, 0.38792342421788906,
                                                                0.4397459050324114])
    assert in_shared(ids, 0, 0.5).tolist() == [True, False, True, True, True]
    assert [int(h) for h in _student_hash((0, i) for i in ids)] == [
        10966979985547027917, 2578857294785040896, 1633711011522769613, 7222796125136383964, 18267636088358633215]
    assert sorted(subset_ids(ids, 2, 0)) == ["train/10001", "train/12345"]
