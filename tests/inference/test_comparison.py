"""Learned vs threshold vs budget at equal MACs on the holdout split (no RLlib needed)."""

import json

import pytest
from typer.testing import CliRunner

from cafe_ray.cli import app
from cafe_ray.inference import save_policy
from cafe_ray.inference.comparison import ROWS, compare_learned, markdown_comparison
from cafe_ray.runs import RunArtifacts
from tests.inference.test_learned import random_mlp


@pytest.fixture(scope="module")
def art(run_dir):
    return RunArtifacts(run_dir)


def test_shared_policy_rows_are_pooled_over_holdout(art, tmp_path):
    w, _ = save_policy(random_mlp(num_classes=10, budget=1.0), tmp_path / "policy")
    c = compare_learned(art, w, steps=11, clients=[0, 1, 2])
    assert list(c.rows) == list(ROWS) and sorted(c.clients) == [0, 1, 2]
    n = sum(art.client_data(i, "holdout")[1].shape[0] for i in (0, 1, 2))
    assert all(r.n == n for r in c.rows.values())
    cascade = art.exit_cost.cascade
    for cid, rows in c.clients.items():
        assert rows["threshold @ learned MACs"].mean_macs <= rows["learned"].mean_macs + 1e-9
        assert rows["full"].mean_macs == cascade[-1]
        s = c.settings[cid]
        assert s["budget_macs"] >= cascade[0] and s["learned_val"]["mean_macs"] <= s["budget_macs"] + 1e-9
    md = markdown_comparison(c)
    assert "| learned |" in md and "| budget @ learned MACs |" in md
    assert c.to_json()["pooled"]["full"]["reduction"] == pytest.approx(1 - cascade[-1] / art.exit_cost.cumulative[-1])


def test_per_client_policies_via_the_cli(run_dir, tmp_path):
    for cid, seed in ((0, 1), (2, 2)):
        save_policy(random_mlp(seed=seed, num_classes=10), tmp_path / "pc" / f"client_{cid}" / "policy")
    res = CliRunner().invoke(app, ["policy", "compare", str(run_dir), "--policy", str(tmp_path / "pc"),
                                   "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [c["client"] for c in data["clients"]] == [0, 2] and data["policy"] == "2 per-client policies"
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith("# Exit policies on `holdout`")


def test_per_client_mapping_must_cover_the_clients(art, tmp_path):
    w, _ = save_policy(random_mlp(num_classes=10), tmp_path / "p")
    with pytest.raises(ValueError, match=r"no learned policy given for clients \[1\]"):
        compare_learned(art, {0: w}, clients=[0, 1])


def test_cli_train_rejects_client_with_per_client(run_dir):
    res = CliRunner().invoke(app, ["policy", "train", str(run_dir), "--client", "0", "--per-client"])
    assert res.exit_code == 2 and "drop --client" in res.output
