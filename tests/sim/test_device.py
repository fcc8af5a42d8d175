"""The device a client actor trains on comes from the GPUs Ray assigned to it."""

import pytest

from cafe_ray.runs import rundir
from cafe_ray.sim.device import choose_device, class_device
from cafe_ray.sim.engine import run_simulation
from tests.sim.conftest import comparable, tiny_cfg


def test_no_gpu_reserved_trains_on_the_cpu():
    c = choose_device([], cuda_count=4)
    assert (c.device, c.gpu_ids) == ("cpu", ())


def test_the_first_assigned_gpu_is_its_position_in_the_visible_devices():
    assert choose_device(["0"], cuda_count=1, visible="0").device == "cuda:0"
    # Ray narrows CUDA_VISIBLE_DEVICES to the actor's ids: GPU 5 of "3,5" is torch's cuda:1
    assert choose_device(["5"], cuda_count=2, visible="3,5").device == "cuda:1"
    # without CUDA_VISIBLE_DEVICES the id is the index
    assert choose_device(["2"], cuda_count=4).device == "cuda:2"


def test_a_gpu_torch_cannot_see_falls_back_to_the_cpu_and_says_why():
    c = choose_device(["0"], cuda_count=0, visible="0")
    assert c.device == "cpu" and c.gpu_ids == ("0",) and "torch sees 0 CUDA device" in c.note


def test_a_standin_takes_the_gpus_place():
    c = choose_device(["1"], cuda_count=0, visible="1", standin="cpu")
    assert c.device == "cpu" and "stands in for cuda:0" in c.note


def test_class_device_for_doctor():
    assert class_device(0.25, cuda_count=1).device == "cuda:0"
    assert class_device(0.0, cuda_count=1).device == "cpu"
    assert class_device(1.0, cuda_count=0).device == "cpu"


@pytest.mark.slow  # two runs on real actors, one through the GPU path
@pytest.mark.usefixtures("ray_session")
def test_a_gpu_class_trains_through_the_device_path_with_the_cpu_metrics(tmp_path):
    """Two actors share the session's GPU (half each) and resolve it from their Ray GPU ids;
    with engine.gpu_standin=cpu the same device path runs here, and CAFEDistill's metrics
    (teacher head, distillation state, personal heads crossing to the store) equal the
    in-process CPU run's bit for bit."""
    sets = ("algorithm.name=cafedistill", "round.num_rounds=3", "round.eval_every=1", "round.fraction=1.0")
    cpu_dir, cpu = run_simulation(tiny_cfg(tmp_path / "cpu", *sets, executor="sequential"), show_progress=False)
    gpu_dir, gpu = run_simulation(tiny_cfg(tmp_path / "gpu", *sets, "engine.gpu_standin=cpu",
                                           "profiles.classes.default={num_gpus: 0.5}"), show_progress=False)
    assert comparable(rundir.read_jsonl(gpu_dir / "metrics.jsonl")) == comparable(
        rundir.read_jsonl(cpu_dir / "metrics.jsonl"))
    assert cpu["devices"] == {"default": ["cpu"]}
    assert gpu["devices"] == {"default": ["cpu (stands in for cuda:0, GPU 0 (engine.gpu_standin))"]}
    recs = [r for r in rundir.read_jsonl(gpu_dir / "clients.jsonl") if r["status"] == "ok"]
    assert recs and all(r["actor_resources"]["GPU"] == 0.5 for r in recs)
    assert len({r["pid"] for r in recs}) == 2  # two actors share the one GPU
