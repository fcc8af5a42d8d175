"""`cafe-ray cluster check`: a Ray cluster-launcher YAML, before `ray up` spends money on it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

console = Console()
err_console = Console(stderr=True)

cluster_app = typer.Typer(help="Ray cluster-launcher configs (cluster.yaml): check before `ray up`.",
                          no_args_is_help=True)


@cluster_app.command("check")
def check(
    cluster_yaml: Annotated[Path, typer.Argument(help="Cluster-launcher YAML, e.g. cluster.yaml.")],
    config: Annotated[list[Path] | None, typer.Option(
        "--config", "-c", help="Simulation config whose device classes must be placeable (repeatable).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a field of every --config: a.b=value (repeatable).")] = None,
    os_: Annotated[list[str] | None, typer.Option(
        "--os", help="Vouch for an image the checker does not know: IMAGE=OS, e.g. ami-0abc=ubuntu22.04; "
                     "hosts=OS for the hosts of a `local` provider (repeatable).")] = None,
    constraints: Annotated[Path | None, typer.Option(
        "--constraints", help="The pinned constraints (default: constraints.txt next to the YAML).")] = None,
) -> None:
    """Ray's schema, then what it cannot see: image OS/glibc vs the pinned wheels, GPU vs the torch
    build, and that every device class of --config is advertised by some node type."""
    from cafe_ray.cluster.check import check_cluster
    from cafe_ray.config import ConfigError, load_config

    vouched: dict[str, str] = {}
    for item in os_ or []:
        image, sep, osname = item.rpartition("=")
        if not sep or not image or not osname:
            err_console.print(f"[red]error:[/] --os {item!r}: expected IMAGE=OS, e.g. --os hosts=ubuntu22.04")
            raise typer.Exit(2)
        vouched[image] = osname
    try:
        cfgs = [load_config(c, set_ or []) for c in config or []]
        report = check_cluster(cluster_yaml, configs=cfgs, constraints=constraints, vouched=vouched)
    except (ConfigError, ValueError) as err:
        err_console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2) from None
    for line in report.notes:
        console.print(f"[green]ok[/]    {line}", highlight=False, soft_wrap=True)
    for line in report.warnings:
        console.print(f"[yellow]warn[/]  {line}", highlight=False, soft_wrap=True)
    for line in report.errors:
        console.print(f"[red]error[/] {line}", highlight=False, soft_wrap=True)
    if not report.ok:
        console.print(f"[red]{cluster_yaml}: {len(report.errors)} problem(s)[/]")
        raise typer.Exit(1)
    console.print(f"[green]{cluster_yaml}: ready for `ray up`[/]")


@cluster_app.command("pin-image")
def pin_image(
    cluster_yaml: Annotated[Path, typer.Argument(help="Cluster-launcher YAML (or, with --from-instance, the "
                                                 "autoscaler's ~/ray_bootstrap_config.yaml on the head).")],
    from_instance: Annotated[bool, typer.Option(
        "--from-instance", help="On the head at bring-up: give worker types that use the head's resolve:ssm: "
                                "image this instance's own AMI id (instance metadata; no SSM permission).")] = False,
) -> None:
    """Write resolved AMI ids for `ImageId: resolve:ssm:...`, so the autoscaler can launch workers
    (it launches them without ssm:GetParameters)."""
    from cafe_ray.cluster import images
    from cafe_ray.config import ConfigError

    try:
        if from_instance:
            ami = images.instance_ami()
            changed = images.pin_bootstrap(cluster_yaml, ami)
            for name in changed:
                console.print(f"node type {name}: ImageId {ami} (this head's own image)", highlight=False,
                              soft_wrap=True)
            if not changed:
                console.print("no worker type uses the head's resolve:ssm: image; nothing to pin")
            return
        resolved = images.pin_file(cluster_yaml, images.ssm_resolver)
    except (ConfigError, OSError) as err:
        err_console.print(Text.assemble(("error:", "red"), " ", str(err)), soft_wrap=True)
        raise typer.Exit(2) from None
    for ssm, ami in resolved.items():
        console.print(f"{ssm} -> {ami}", highlight=False, soft_wrap=True)
    console.print(f"{cluster_yaml}: {len(resolved)} image(s) pinned" if resolved
                  else f"{cluster_yaml}: no resolve:ssm: image to pin", soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(cluster_app, name="cluster")
