"""`cafe-ray bench ... --json`: one JSON object per row, the ratios included."""

from __future__ import annotations

import inspect
import json

from typer.testing import CliRunner

from cafe_ray.bench import rows
from cafe_ray.bench.memory import MemoryResult
from cafe_ray.bench.overhead import EngineTiming, FloorTiming, OverheadResult
from cafe_ray.bench.scale import ScaleResult
from cafe_ray.bench.startup import StartupResult
from cafe_ray.cli import app


def test_overhead_rows_carry_the_tables_ratios():
    r = OverheadResult("tiny", client_rounds=10, workers=2, per_round=5, parallel=[1.0, 1.2])
    r.engine += [EngineTiming(4.0, 3.0, 1.5, (0.5,), 1.0), EngineTiming(5.0, 4.0, 2.0, (0.5,), 1.1)]
    r.floor += [FloorTiming(4.0, (0.5,), 0.9), FloorTiming(6.0, (0.5,), 1.2)]
    (row,) = rows.overhead_rows([r])
    assert row["workload"] == "tiny" and row["ideal_floor_s"] == 2.0
    assert row["engine_vs_ideal_min"] == r.ratio("min") == 1.5
    assert row["steady_vs_ideal_median"] == r.steady_ratio("median")
    assert row["steady_vs_parallel_min"] == r.steady_vs_parallel("min")
    assert row["load"] == [1.0, 0.9, 1.1, 1.2]
    json.dumps(row)  # a JSON object as it stands


def test_scale_startup_memory_rows_add_their_ratio_rows():
    sc = [ScaleResult(1000, 100, 3.0, 0.2, (1.0, 0.2, 0.2), 900.0, 1.0),
          ScaleResult(10**6, 100, 9.0, 0.3, (2.0, 0.3, 0.3), 2000.0, 1.0)]
    out = rows.scale_rows(sc, 1000, 10**6)
    assert [r.get("registered") for r in out[:2]] == [1000, 10**6]
    assert out[2]["ratio"].startswith("steady_round_time") and abs(out[2]["min"] - 1.5) < 1e-9
    st = [StartupResult(1.0, 2.0, 3.0, 4.0, 0.5), StartupResult(1.0, 2.0, 3.0, 6.0, 0.5)]
    out = rows.startup_rows(st, "q.yaml")
    assert out[-1]["summary"] and out[-1]["beyond_ray_init_s_min"] == 7.0 and out[-1]["total_s_median"] == 11.0
    out = rows.memory_rows([MemoryResult(100, 50, 1000.0, 1.0), MemoryResult(1000, 50, 1100.0, 9.0)])
    assert abs(out[-1]["value"] - 1.1) < 1e-9


def test_bench_cohort_json_to_stdout_is_one_object_per_line(tmp_path):
    r = CliRunner().invoke(app, ["bench", "cohort", "--clients", "2", "--repeats", "1", "--json", "-"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()]
    assert [ln["clients"] for ln in lines] == [2, 16, 16, 16]  # the synthetic cohort, then digits (3); no table
    assert all(ln["bench"] == "cohort" and ln["speedup_min"] > 0 for ln in lines)
    f = tmp_path / "cohort.jsonl"
    r = CliRunner().invoke(app, ["bench", "cohort", "--clients", "2", "--repeats", "1", "--json", str(f)])
    assert r.exit_code == 0 and "speed-up" in r.output  # the table as well
    assert [json.loads(ln)["clients"] for ln in f.read_text().splitlines()] == [2, 16, 16, 16]


def test_bench_startup_without_a_config_file_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default config is found from anywhere; a missing one is named
    r = CliRunner().invoke(app, ["bench", "startup", "nowhere.yaml", "--repeats", "1"])
    assert r.exit_code == 2 and "no config file at nowhere.yaml" in r.output and "Traceback" not in r.output


def test_bench_startup_default_config_does_not_depend_on_the_working_folder():
    from cafe_ray.cli import DEFAULT_CONFIG, bench_startup

    assert DEFAULT_CONFIG.is_file() and DEFAULT_CONFIG.is_absolute()
    assert inspect.signature(bench_startup).parameters["config"].default == DEFAULT_CONFIG
