import numpy as np
import pytest

from coopt_ray.config import ConfigError
from coopt_ray.data import owner_of, shared_size, shared_subset, split

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


def test_shared_subset_size_and_membership():
    s = shared_subset(IDS, 0.0005, 16, seed=0)
    assert len(s) == 16 and set(s) <= set(IDS) and len(set(s)) == 16
    assert len(shared_subset(IDS, 0.01, 16, seed=0)) == 50 == shared_size(5000, 0.01, 16)


def test_shared_subset_bigger_than_data_is_config_error():
    with pytest.raises(ConfigError, match="bigger than the data"):
        shared_subset(IDS[:10], 0.5, 16, seed=0)


def test_owner_depends_on_id_not_order():
    a = owner_of(IDS[:100], 3, 0)
    b = owner_of(IDS[:100][::-1], 3, 0)[::-1]
    assert np.array_equal(a, b)
