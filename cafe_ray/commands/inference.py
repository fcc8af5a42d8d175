"""`cafe-ray evaluate` (accuracy vs MACs) and `cafe-ray policy train|compare|fit|equal-macs` (learned exit policies)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

SPLITS = ("test", "val", "holdout", "train")


def _fail(msg: str) -> None:
    err_console.print(f"[red]error:[/] {msg}")
    raise typer.Exit(2)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        _fail(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")


def register(app: typer.Typer) -> None:
    policy_app = typer.Typer(no_args_is_help=True,
                             help="Learned exit policies: train with RLlib or fit a cascade, compare with thresholds.")
    app.add_typer(policy_app, name="policy")

    @app.command()
    def evaluate(
        run_dirs: Annotated[list[Path], typer.Argument(help="Run directories written by `cafe-ray simulate`.")],
        out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: RUN_DIR/inference).")] = None,
        split: Annotated[str, typer.Option("--split", help="Client split: test, val, holdout or train.")] = "test",
        steps: Annotated[int, typer.Option("--steps", help="Thresholds swept evenly over [0, 1] (+0.6).")] = 21,
        calibrate_on: Annotated[str, typer.Option(
            "--calibrate-on", help="Also choose the <=1-point threshold on this split and report it on --split "
                                   "('val' needs data.val_fraction > 0 for --split test; 'none' to skip).")] = "val",
        calibrate_confidence: Annotated[float | None, typer.Option(
            "--calibrate-confidence", help="Choose the calibrated threshold with a one-sided bound on the paired "
                                           "accuracy drop at this confidence, e.g. 0.9 (default: the point "
                                           "estimate).")] = None,
    ) -> None:
        """Accuracy vs mean MACs per sample as the exit threshold sweeps; cost reduction table + plot."""
        from cafe_ray.inference.evaluate import evaluate_run, label_runs, rich_table, write_report

        _check_split(split)
        if steps < 2:
            _fail(f"--steps must be >= 2, got {steps}")
        if calibrate_confidence is not None and not 0 < calibrate_confidence < 1:
            _fail(f"--calibrate-confidence must be in (0, 1), e.g. 0.9; got {calibrate_confidence}")
        evals = []
        from cafe_ray.inference.evaluate import calibration_is_disjoint
        from cafe_ray.runs import RunArtifacts

        for rd in run_dirs:
            try:
                art = RunArtifacts(rd)
                calib = calibrate_on if calibrate_on != "none" else None
                if calib is not None and not calibration_is_disjoint(art, split, calib):
                    console.print(f"[yellow]note:[/] {rd}: no validation-calibrated point ('{calib}' overlaps "
                                  f"'{split}'; set data.val_fraction > 0 or use --split holdout)")
                    calib = None
                evals.append(evaluate_run(art, split=split, steps=steps, calibrate_on=calib,
                                          calibrate_confidence=calibrate_confidence))
            except (FileNotFoundError, ValueError) as err:
                _fail(str(err))
        label_runs(evals)
        paths = write_report(evals, out or Path(run_dirs[0]) / "inference")
        console.print(rich_table(evals))
        console.print(f"table: {paths['markdown']}  json: {paths['json']}  plot: {paths['plot']}")

    @policy_app.command("train")
    def train(
        run_dir: Annotated[Path, typer.Argument(help="Run directory written by `cafe-ray simulate`.")],
        client: Annotated[int | None, typer.Option("--client", help="Train on this client only "
                                                   "(default: one policy on every client's data, pooled).")] = None,
        per_client: Annotated[bool, typer.Option("--per-client", help="One policy per client, each on its "
                                                 "own data, in OUT/client_<ID>/.")] = False,
        recipe: Annotated[Path | None, typer.Option("--recipe", help="Recipe YAML "
                                                    "(default: policies/ppo_default.yaml).")] = None,
        cost_weight: Annotated[float | None, typer.Option("--cost-weight", help="Reward lost per full-depth "
                                                          "forward pass (overrides the recipe).")] = None,
        iterations: Annotated[int | None, typer.Option("--iterations", help="RLlib train() calls "
                                                       "(overrides the recipe).")] = None,
        out: Annotated[Path | None, typer.Option("--out", help="Output folder "
                                                 "(default: RUN_DIR/policies/<recipe>[-client<ID>]).")] = None,
        compare: Annotated[bool, typer.Option("--compare/--no-compare", help="Compare on the holdout split "
                                              "afterwards.")] = True,
        address: Annotated[str | None, typer.Option("--address", help="Ray cluster address.")] = None,
    ) -> None:
        """Train an exit policy with RLlib on cafe_ray/EarlyExit-v0; export it as safetensors + JSON."""
        from cafe_ray.envs.training import (
            DEFAULT_RECIPE,
            load_recipe,
            train_for_run,
            train_per_client,
        )
        from cafe_ray.sim.engine import ensure_ray

        if per_client and client is not None:
            _fail("--per-client trains every client; drop --client (or drop --per-client for one client)")
        try:
            rec = load_recipe(recipe).with_overrides(cost_weight=cost_weight, iterations=iterations)
        except (FileNotFoundError, ValueError) as err:
            _fail(str(err))
        name = (recipe or DEFAULT_RECIPE).stem + ("-per-client" if per_client else
                                                   "" if client is None else f"-client{client}")
        dest = out or Path(run_dir) / "policies" / name
        ensure_ray(address)

        def show(r: dict, who: str = "") -> None:
            ret = r["episode_return_mean"]
            console.print(f"{who}iteration {r['iteration']:>3}/{rec.iterations}  return "
                          f"{'-' if ret is None else f'{ret:.3f}'}  {r['seconds']:.0f}s")

        try:
            if per_client:
                results = train_per_client(run_dir, rec, dest, on_iteration=lambda c, r: show(r, f"client {c} "))
                for c, res in results.items():
                    console.print(f"client {c} policy: {res.weights} (+ {res.sidecar.name}), {res.seconds:.0f}s")
                if compare:
                    _compare(run_dir, {c: r.weights for c, r in results.items()}, dest, None)
                return
            res = train_for_run(run_dir, rec, dest, client=client, on_iteration=show)
        except (FileNotFoundError, KeyError, ValueError) as err:
            _fail(str(err))
        console.print(f"policy: {res.weights} (+ {res.sidecar.name}), {res.seconds:.0f}s")
        if compare:
            _compare(run_dir, res.weights, dest, client)

    @policy_app.command("compare")
    def compare_cmd(
        run_dir: Annotated[Path, typer.Argument(help="Run directory written by `cafe-ray simulate`.")],
        policy: Annotated[Path, typer.Option("--policy", help="Learned policy (.safetensors, its .json, or "
                                             "a folder holding policy.*).")],
        client: Annotated[int | None, typer.Option("--client", help="Only this client.")] = None,
        out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: the policy's).")] = None,
    ) -> None:
        """Learned vs threshold vs budget policies on the holdout split, at equal mean MACs.

        --policy may also be a `--per-client` output folder (client_<ID>/policy.*): each client is
        then run with its own policy."""
        target: Path | dict[int, Path] = policy
        if policy.is_dir() and not (policy / "policy.safetensors").is_file():
            found = {int(d.name.removeprefix("client_")): d / "policy.safetensors"
                     for d in policy.glob("client_*") if (d / "policy.safetensors").is_file()
                     and d.name.removeprefix("client_").isdigit()}
            if found:
                target = dict(sorted(found.items()))
        _compare(run_dir, target, out or (policy if policy.is_dir() else policy.parent), client)

    @policy_app.command("fit")
    def fit_cmd(
        run_dir: Annotated[Path, typer.Argument(help="Run directory written by `cafe-ray simulate`.")],
        out: Annotated[Path | None, typer.Option("--out", help="Output folder "
                                                 "(default: RUN_DIR/policies/cascade).")] = None,
        split: Annotated[str, typer.Option("--split", help="Split to fit on: val or train (never test or "
                                           "holdout, which overlap where the policy is judged).")] = "val",
        hidden: Annotated[int, typer.Option("--hidden", help="Hidden width of every exit's MLP "
                                            "(0: linear).")] = 32,
        steps: Annotated[int, typer.Option("--steps", help="Full-batch AdamW steps per exit.")] = 300,
        weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = 1e-2,
        context: Annotated[str, typer.Option("--context", help="--decide cascade: label_prior (the client's "
                                             "training label frequencies are MLP features) or none.")] = "label_prior",
        members: Annotated[int, typer.Option("--members", help="Ensemble size per exit (averaged; "
                                             "--decide cascade).")] = 5,
        combine: Annotated[str, typer.Option("--combine", help="Answer with a learned combination of every "
                                             "exit so far: prior (plus the client's label prior), plain, or "
                                             "none (each exit alone).")] = "prior",
        decide: Annotated[str, typer.Option("--decide", help="threshold (stop on the combined max "
                                            "probability) or cascade (per-exit MLPs predict the gain of "
                                            "continuing).")] = "threshold",
        seed: Annotated[int, typer.Option("--seed", help="Initialisation seed.")] = 0,
        cv_folds: Annotated[int, typer.Option("--cv-folds", help="Also print a K-fold estimate, inside the "
                                              "fit split, of the gain over a threshold at equal MACs "
                                              "(0: skip).")] = 0,
        compare: Annotated[bool, typer.Option("--compare/--no-compare", help="Run `policy equal-macs` "
                                              "afterwards (default budgets).")] = False,
    ) -> None:
        """Fit an exit policy on val exit traces: combined exits, then a threshold or a learned cascade."""
        from cafe_ray.inference.cascade import (
            COMBINES,
            CONTEXTS,
            DECIDES,
            FitSettings,
            cv_for_run,
            fit_for_run,
            save_cascade,
        )

        _check_split(split)
        if hidden < 0 or steps < 1 or weight_decay < 0 or members < 1 or cv_folds < 0 or cv_folds == 1:
            _fail(f"need --hidden >= 0, --steps >= 1, --weight-decay >= 0, --members >= 1 and --cv-folds 0 or >= 2; "
                  f"got {hidden}, {steps}, {weight_decay}, {members}, {cv_folds}")
        if context not in CONTEXTS:
            _fail(f"--context must be one of {', '.join(CONTEXTS)}, got {context!r}")
        if combine not in COMBINES:
            _fail(f"--combine must be one of {', '.join(COMBINES)}, got {combine!r}")
        if decide not in DECIDES:
            _fail(f"--decide must be one of {', '.join(DECIDES)}, got {decide!r}")
        dest = out or Path(run_dir) / "policies" / "cascade"
        settings = FitSettings(hidden=(hidden,) if hidden else (), steps=steps, weight_decay=weight_decay,
                               seed=seed, context=context, members=members, combine=combine, decide=decide)
        try:
            net = fit_for_run(run_dir, settings, split=split)
            cv = cv_for_run(run_dir, settings, split=split, folds=cv_folds) if cv_folds else None
        except (FileNotFoundError, KeyError, ValueError) as err:
            _fail(str(err))
        weights, sidecar = save_cascade(net, dest / "policy")
        what = f"decide {decide}, combine {combine}"
        if "default_threshold" in net.spec.meta:
            what += f"; default threshold {net.spec.meta['default_threshold']:.4f} (cheapest within 1 point on {split})"
        if "final_loss" in net.spec.meta:
            what += "; final loss per exit " + ", ".join(f"{v:.3f}" for v in net.spec.meta["final_loss"])
        for row in net.spec.meta.get("combiner", []):
            what += f"; exit {row['exit']}: weights {row['weights']}, prior {row['prior_weight']}"
        console.print(f"exit policy: {weights} (+ {sidecar.name}); {net.spec.meta['samples']} {split} samples, "
                      f"{what}")
        if cv is not None:
            (dest / "cv.json").write_text(json.dumps(cv, indent=1) + "\n")
            console.print(f"{cv['folds']}-fold estimate on {split} (policy - threshold at equal MACs, points): "
                          + ", ".join(f"{100 * float(b):.0f}% MACs {100 * v['gain_curve']:+.2f}"
                                      for b, v in cv["budgets"].items())
                          + f"; mean {100 * cv['mean_gain_curve']:+.2f}  ({dest / 'cv.json'})")
        if compare:
            _equal_macs(run_dir, weights, dest, None, 1000, 0)

    @policy_app.command("equal-macs")
    def equal_macs_cmd(
        run_dir: Annotated[Path, typer.Argument(help="Run directory written by `cafe-ray simulate`.")],
        policy: Annotated[Path, typer.Option("--policy", help="A saved exit policy: a cascade "
                                             "(`policy fit`) or an RL policy (`policy train`).")],
        budgets: Annotated[str | None, typer.Option("--budgets", help="Comma-separated val MAC budgets as "
                                                    "fractions of full depth (cascade only; default "
                                                    "0.1,0.15,0.2,0.25,0.3,0.5).")] = None,
        resamples: Annotated[int, typer.Option("--resamples", help="Bootstrap resamples.")] = 1000,
        seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
        out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: the policy's).")] = None,
    ) -> None:
        """A policy vs thresholds calibrated on val at the same MACs, on holdout, with paired bootstrap CIs."""
        try:
            bs = None if budgets is None else [float(b) for b in budgets.split(",") if b.strip()]
        except ValueError:
            _fail(f"--budgets must be comma-separated numbers such as 0.25,0.5, got {budgets!r}")
        if resamples < 10:
            _fail(f"--resamples must be >= 10, got {resamples}")
        _equal_macs(run_dir, policy, out or (policy if policy.is_dir() else policy.parent), bs, resamples, seed)


def _equal_macs(run_dir: Path, policy: Path, out: Path, budgets: list[float] | None, resamples: int,
                seed: int) -> None:
    from cafe_ray.inference.matched import equal_mac_comparison, rich_equal_macs, write_equal_macs

    try:
        r = equal_mac_comparison(run_dir, policy, budgets=budgets, resamples=resamples, seed=seed)
    except (FileNotFoundError, KeyError, ValueError) as err:
        _fail(str(err))
    paths = write_equal_macs(r, out)
    console.print(rich_equal_macs(r))
    console.print(f"table: {paths['markdown']}  json: {paths['json']}  plot: {paths['plot']}")


def _compare(run_dir: Path, policy: Path | dict[int, Path], out: Path, client: int | None) -> None:
    from cafe_ray.inference.comparison import compare_learned, rich_comparison, write_comparison

    try:
        c = compare_learned(run_dir, policy, clients=None if client is None else [client])
    except (FileNotFoundError, KeyError, ValueError) as err:
        _fail(str(err))
    paths = write_comparison(c, out)
    console.print(rich_comparison(c))
    console.print(f"table: {paths['markdown']}  json: {paths['json']}")
