"""The second best-model criterion (issue 17): coverage = how well a participant's space on S linearly predicts
every other participant's, by closed-form leave-one-out. Known answers, and score_and_align picking by it."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coopt_ray.align import coverage, loo_r2
from coopt_ray.config import ConfigError, parse_config
from coopt_ray.merge import score_and_align
from coopt_ray.uniformity import best_participant


def spaces(n=40, seed=0):
    """rich: 8-d features; sub: a 3-d linear function of rich; noise: 32-d isotropic and unrelated to both."""
    rng = np.random.default_rng(seed)
    rich = rng.normal(size=(n, 8)) * np.linspace(3, 0.5, 8)
    sub = rich @ rng.normal(size=(8, 3)) + 0.01 * rng.normal(size=(n, 3))
    return {"rich": rich, "sub": sub, "noise": rng.normal(size=(n, 32))}


def test_loo_r2_is_near_one_for_a_linear_map_and_near_zero_for_noise():
    m = spaces()
    assert loo_r2(m["rich"], m["sub"]) > 0.99
    assert loo_r2(m["rich"], m["noise"]) < 0.05  # leave-one-out: fitting noise does not pay
    assert loo_r2(m["sub"], m["rich"]) < 0.9     # 3 dims cannot hold 8


def test_coverage_ranks_the_space_that_holds_the_others_first():
    c = coverage(spaces())
    assert c["rich"] > c["sub"] > c["noise"]
    assert best_participant(c, higher_is_better=True) == "rich"
    assert best_participant({"a": 0.1, "b": 0.7}, higher_is_better=True) == "b"


def _run_with(tmp_path, mats, method):
    raw = {"data": {"source": "fashion-mnist"}, "score": {"method": method},
           "participants": [{"name": n, "model": f"local-dir:{n}"} for n in mats]}
    cfg = parse_config(raw)
    n = len(next(iter(mats.values())))
    for name, x in mats.items():
        d = tmp_path / "embeddings" / name
        d.mkdir(parents=True)
        pq.write_table(pa.table({"id": [f"i{j}" for j in range(n)], "embedding": [list(map(float, r)) for r in x],
                                 "is_shared": [True] * n, "error": [""] * n}), d / "part-0.parquet")
    return score_and_align(cfg, tmp_path)


@pytest.mark.parametrize("method,best", [("uniformity", "noise"), ("coverage", "rich")])
def test_score_and_align_picks_by_the_configured_criterion(tmp_path, method, best):
    # isotropic noise in 32 dims is the most spread-out (lowest uniformity) but predicts nothing else
    scored = _run_with(tmp_path, spaces(), method)
    assert scored["best"] == best
    assert min(scored["uniformity"], key=scored["uniformity"].get) == "noise"
    assert max(scored["coverage"], key=scored["coverage"].get) == "rich"
    assert scored["alignments"][best] is None and all(scored["alignments"][k] is not None for k in spaces() if k != best)


def test_unknown_score_method_is_a_config_error():
    with pytest.raises(ConfigError, match="'score.method' must be one of uniformity, coverage"):
        parse_config({"score": {"method": "vibes"}, "participants": [{"name": "a", "model": "x"}]})
    with pytest.raises(ConfigError, match="score.metod"):
        parse_config({"score": {"metod": "coverage"}, "participants": [{"name": "a", "model": "x"}]})
