"""`cafe-ray cluster pin-image`: write resolved AMI ids into a cluster YAML.

EC2 resolves an ``ImageId: resolve:ssm:PARAMETER`` with the rights of whoever launches
the instance. ``ray up`` launches the head with your credentials, but the workers are
launched by the head's autoscaler under Ray's default instance profile (``ray-autoscaler-v1``:
EC2 and S3 access, no ``ssm:GetParameters``), so every worker launch is refused. Two ways
out, both here:

* :func:`pin_file` resolves every ``resolve:ssm:`` image of a cluster YAML now (with your
  credentials, through a :data:`Resolver`) and writes the AMI ids into the file, each with
  a ``# pinned from resolve:ssm:...`` comment that `cluster check` reads the OS from;
* :func:`pin_bootstrap` runs on the head at bring-up (``--from-instance``): the head booted
  from the same parameter, so its own AMI id (instance metadata, no permission needed) is
  the resolved value; it is written into the autoscaler's config
  (``~/ray_bootstrap_config.yaml``) for every worker type that uses the head's parameter.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cafe_ray.config import ConfigError

SSM = "resolve:ssm:"
PIN_NOTE = "# pinned from "
IMDS_ENV = "CAFE_RAY_IMDS_URL"  # instance metadata endpoint (a local stand-in in tests)
IMDS_URL = "http://169.254.169.254"

# region, [parameter names] -> {parameter name: ami id}
Resolver = Callable[[str, list[str]], dict[str, str]]

_IMAGE_LINE = re.compile(r"^(?P<lead>\s*ImageId:\s*)(?P<q>['\"]?)(?P<image>resolve:ssm:[^\s'\"#]+)(?P=q)(?P<tail>.*)$")
_PINNED_LINE = re.compile(r"ImageId:\s*['\"]?(?P<ami>ami-[0-9a-f]+)['\"]?\s*#\s*pinned from\s+(?P<ssm>resolve:ssm:\S+)")


def ssm_resolver(region: str, names: list[str]) -> dict[str, str]:
    """Resolve SSM parameters with boto3 and your AWS credentials (what `ray up` uses)."""
    try:
        import boto3
    except ImportError:
        raise ConfigError("pin-image needs boto3 and AWS credentials (pip install boto3; aws configure), as "
                          "`ray up` on AWS does; or resolve by hand: aws ssm get-parameters --names NAME "
                          "--query 'Parameters[].Value'") from None
    client = boto3.client("ssm", region_name=region)
    out: dict[str, str] = {}
    for i in range(0, len(names), 10):  # GetParameters takes at most 10 names
        resp = client.get_parameters(Names=names[i:i + 10])
        out.update({p["Name"]: p["Value"] for p in resp.get("Parameters", [])})
        for bad in resp.get("InvalidParameters", []):
            raise ConfigError(f"SSM parameter {bad!r} does not exist in {region}; check its name and the region")
    return out


def pinned_sources(text: str) -> dict[str, str]:
    """ami id -> the ``resolve:ssm:`` value it was pinned from (the pin comments of a cluster YAML)."""
    return {m.group("ami"): m.group("ssm") for m in _PINNED_LINE.finditer(text)}


def pin_text(text: str, region: str, resolve: Resolver) -> tuple[str, dict[str, str]]:
    """The YAML text with every ``ImageId: resolve:ssm:...`` line pinned; comments kept."""
    wanted = sorted({m.group("image") for line in text.splitlines() if (m := _IMAGE_LINE.match(line))})
    if not wanted:
        return text, {}
    names = [w[len(SSM):] for w in wanted]
    got = resolve(region, names)
    resolved: dict[str, str] = {}
    for w, n in zip(wanted, names, strict=True):
        ami = got.get(n)
        if not ami or not re.fullmatch(r"ami-[0-9a-f]+", ami):
            raise ConfigError(f"SSM parameter {n!r} resolved to {ami!r} in {region}, not an AMI id")
        resolved[w] = ami
    lines = []
    for line in text.splitlines(keepends=True):
        m = _IMAGE_LINE.match(line.rstrip("\n"))
        if m:
            end = "\n" if line.endswith("\n") else ""
            line = f"{m.group('lead')}{resolved[m.group('image')]}  {PIN_NOTE}{m.group('image')}{end}"
        lines.append(line)
    return "".join(lines), resolved


def pin_file(path: str | Path, resolve: Resolver | None = None) -> dict[str, str]:
    """Resolve and write in every ``resolve:ssm:`` image of a cluster YAML; returns {ssm value: ami}."""
    p = Path(path)
    text = p.read_text()
    raw = yaml.safe_load(text)
    if not isinstance(raw, dict) or (raw.get("provider") or {}).get("type") != "aws":
        raise ConfigError(f"{p}: pin-image is for AWS cluster configs (provider.type: aws)")
    region = str(raw["provider"].get("region") or "")
    if not region:
        raise ConfigError(f"{p}: provider.region is not set; pin-image resolves images in that region")
    new, resolved = pin_text(text, region, resolve or ssm_resolver)
    if resolved:
        p.write_text(new)
    return resolved


def instance_ami(timeout_s: float = 2.0) -> str:
    """This EC2 instance's AMI id, from the instance metadata service (IMDSv2)."""
    base = os.environ.get(IMDS_ENV, IMDS_URL).rstrip("/")
    try:
        req = urllib.request.Request(f"{base}/latest/api/token", method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            token = r.read().decode()
        req = urllib.request.Request(f"{base}/latest/meta-data/ami-id",
                                     headers={"X-aws-ec2-metadata-token": token})
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            ami = r.read().decode().strip()
    except OSError as err:
        raise ConfigError(f"--from-instance: no instance metadata at {base} ({err}); run it on the cluster's "
                          "head (an EC2 instance)") from None
    if not re.fullmatch(r"ami-[0-9a-f]+", ami):
        raise ConfigError(f"--from-instance: the instance metadata gave {ami!r}, not an AMI id")
    return ami


def pin_bootstrap(path: str | Path, ami: str) -> list[str]:
    """Give every worker type that uses the head's ``resolve:ssm:`` image the head's own AMI id.

    ``path`` is the autoscaler's config on the head (JSON, as ``ray up`` writes it); returns
    the worker types changed. A worker type on another parameter is left as it is (and
    `cluster check` names it).
    """
    p = Path(path)
    try:
        raw: dict[str, Any] = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{p}: cannot read the autoscaler config ({err})") from None
    types = raw.get("available_node_types") or {}
    head = raw.get("head_node_type")
    head_image = str(((types.get(head) or {}).get("node_config") or {}).get("ImageId", ""))
    if not head_image.startswith(SSM):
        return []
    changed = []
    for name, nt in types.items():
        cfg = nt.get("node_config") or {}
        if name != head and cfg.get("ImageId") == head_image:
            cfg["ImageId"] = ami
            changed.append(name)
    if changed:
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(raw))
        os.replace(tmp, p)
    return changed
