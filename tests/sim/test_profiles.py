import json

import numpy as np
import pytest

from cafe_ray.config import ProfilesConfig
from cafe_ray.sim.profiles import (
    CATALOGS,
    DeviceProfile,
    ResourceClass,
    assign_profiles,
    check_fits,
    load_trace,
    resolve_catalog,
)
from cafe_ray.sim.seeds import derive_seed, rng


def test_compute_time_follows_the_clock_model():
    p = DeviceProfile("x", "c", flops=1e9, downlink_mbps=8, uplink_mbps=4)
    # 3 x MACs x samples / speed
    assert p.compute_seconds(1_000_000, 100) == pytest.approx(3 * 1e6 * 100 / 1e9)
    # bytes * 8 / (Mbit/s * 1e6)
    assert p.comm_seconds(1_000_000, 500_000) == pytest.approx(1.0 + 1.0)


def test_fedscale_speed_overrides_flops():
    p = DeviceProfile("x", "c", sec_per_sample=0.01)
    assert p.compute_seconds(10**12, 50) == pytest.approx(0.5)


def test_iot_mix_proportions_exact_and_seeded():
    cat = resolve_catalog(ProfilesConfig(catalog="iot_mix"))
    a = assign_profiles(cat, 100, seed=1)
    names = [p.name for p in a]
    assert names.count("phone") == 50 and names.count("single_board") == 30 and names.count("edge_gpu") == 20
    assert [p.name for p in assign_profiles(cat, 100, seed=1)] == names
    assert [p.name for p in assign_profiles(cat, 100, seed=2)] != names


def test_unknown_catalog_names_the_field():
    with pytest.raises(ValueError, match=r"profiles.catalog: unknown catalog 'nope'"):
        resolve_catalog(ProfilesConfig(catalog="nope"))


def test_class_overrides_apply_and_unknown_class_rejected():
    cat = resolve_catalog(ProfilesConfig(catalog="iot_mix", classes={"phone": {"num_cpus": 0.1, "actors": 3}}))
    phone = next(c for c in cat.classes if c.name == "phone")
    assert phone.num_cpus == 0.1 and phone.actors == 3
    with pytest.raises(ValueError, match=r"profiles.classes: unknown class"):
        resolve_catalog(ProfilesConfig(catalog="iot_mix", classes={"tablet": {"num_cpus": 1}}))


def test_fedscale_trace_availability(tmp_path):
    trace = {"devices": [
        {"computation": 20.0, "communication": 8000.0, "active": [0, 100], "inactive": [50, 150], "finish_time": 200},
        {"computation": 5.0, "communication": 1000.0, "class": "fast"},
    ]}
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    cat = load_trace(path)
    p0 = cat.tiers[0][0]
    assert p0.sec_per_sample == pytest.approx(0.02) and p0.downlink_mbps == pytest.approx(8.0)
    g = np.random.default_rng(0)
    assert p0.is_online(10, g) and not p0.is_online(60, g) and p0.is_online(120, g)
    assert p0.is_online(210, g)  # wraps at finish_time
    assert {c.name for c in cat.classes} == {"trace", "fast"}
    profiles = assign_profiles(cat, 5, seed=0)
    assert [p.name for p in profiles] == ["trace_0", "trace_1", "trace_0", "trace_1", "trace_0"]


def test_bad_trace_is_explained(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"devices": [{"communication": 1}]}))
    with pytest.raises(ValueError, match=r"devices\[0\] needs 'computation'"):
        load_trace(path)


def test_check_fits_shrinks_pools_then_explains():
    classes = [ResourceClass("a", num_cpus=1, actors=3), ResourceClass("b", num_cpus=0.5, actors=2)]
    fitted = check_fits(classes, {"CPU": 2.0})
    assert sum(c.actors * c.num_cpus for c in fitted) <= 2.0
    assert all(c.actors >= 1 for c in fitted)
    with pytest.raises(ValueError, match=r"profiles.classes.<class>.num_gpus"):
        check_fits([ResourceClass("gpu", num_cpus=0, num_gpus=1, actors=1)], {"CPU": 2.0})
    with pytest.raises(ValueError, match=r"resources.tpu"):
        check_fits([ResourceClass("t", num_cpus=0, resources={"tpu": 1}, actors=1)], {"CPU": 2.0})


def test_seeds_are_pure_functions_of_coordinates():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, r, c) for r in range(20) for c in range(20)}) == 400
    assert rng(3, 1).random() == rng(3, 1).random()


def test_catalogs_documented():
    for cat in CATALOGS.values():
        assert cat.description and abs(sum(f for _, f in cat.tiers) - 1.0) < 1e-9
