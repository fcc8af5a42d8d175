"""`cafe-ray cluster check`: a cluster-launcher YAML against Ray's schema and what it cannot see.

Ray's validator accepts a config whose nodes can never install the project: an image
whose glibc is older than the pinned wheels need (torch, torchvision and pyarrow are
manylinux_2_28 wheels: glibc >= 2.28), a GPU whose architecture or driver the pinned
torch CUDA build does not support, or worker types that advertise none of the custom
resources the simulation's device classes ask for (the autoscaler then never adds a
node for them). These checks read:

* the image of every node type (AWS ``node_config.ImageId``, GCP boot-disk
  ``sourceImage``; the hosts of a ``local`` provider have none) and derive its OS from
  a table of known images and image families (:data:`OS_GLIBC`, :func:`image_info`);
  an image the table does not know is refused unless ``--os IMAGE=OS`` vouches for it;
* the glibc the wheels pinned in constraints.txt need, from the manylinux tags of the
  wheels installed here (``*.dist-info/WHEEL``);
* the torch CUDA build from constraints.txt (``nvidia-cuda-runtime`` major) and the GPU
  of each instance type (:data:`AWS_GPUS`, :data:`GCP_GPUS`);
* the device classes of simulation configs (``--config``): each custom resource a class
  asks for must be advertised by some node type, and a GPU class needs a GPU node type.
"""

from __future__ import annotations

import copy
import importlib.metadata as md
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# OS -> its glibc (major, minor)
OS_GLIBC: dict[str, tuple[int, int]] = {
    "ubuntu18.04": (2, 27), "ubuntu20.04": (2, 31), "ubuntu22.04": (2, 35), "ubuntu24.04": (2, 39),
    "debian11": (2, 31), "debian12": (2, 36), "amazonlinux2": (2, 26), "amazonlinux2023": (2, 34),
    "rocky8": (2, 28), "rocky9": (2, 34),
}

# CUDA major of the torch build -> (least NVIDIA driver, least GPU compute capability)
CUDA_NEEDS: dict[int, tuple[int, tuple[int, int]]] = {
    13: (580, (7, 5)),  # CUDA 13 dropped Maxwell, Pascal and Volta (sm_50..sm_70)
    12: (525, (5, 0)),
    11: (450, (3, 7)),
}

# AWS instance family -> (GPU, compute capability)
AWS_GPUS: dict[str, tuple[str, tuple[int, int]]] = {
    "p2": ("K80", (3, 7)), "g3": ("M60", (5, 2)), "g3s": ("M60", (5, 2)), "p3": ("V100", (7, 0)),
    "p3dn": ("V100", (7, 0)), "g4dn": ("T4", (7, 5)), "g5": ("A10G", (8, 6)), "g6": ("L4", (8, 9)),
    "gr6": ("L4", (8, 9)), "g6e": ("L40S", (8, 9)), "p4d": ("A100", (8, 0)), "p4de": ("A100", (8, 0)),
    "p5": ("H100", (9, 0)), "p5e": ("H200", (9, 0)), "p5en": ("H200", (9, 0)),
}

# AWS instance type -> (vCPUs, GPUs): what Ray detects on the node (EC2 instance type pages)
AWS_SIZES: dict[str, tuple[int, int]] = {
    "m5.large": (2, 0), "m5.xlarge": (4, 0), "m5.2xlarge": (8, 0), "m5.4xlarge": (16, 0), "m5.8xlarge": (32, 0),
    "m5.12xlarge": (48, 0), "m5.16xlarge": (64, 0), "m5.24xlarge": (96, 0), "c5.2xlarge": (8, 0),
    "c5.4xlarge": (16, 0), "c5.9xlarge": (36, 0), "c6i.4xlarge": (16, 0), "m6i.4xlarge": (16, 0),
    "m7i.4xlarge": (16, 0), "g4dn.xlarge": (4, 1), "g4dn.2xlarge": (8, 1), "g4dn.12xlarge": (48, 4),
    "g5.xlarge": (4, 1), "g5.2xlarge": (8, 1), "g5.4xlarge": (16, 1), "g5.12xlarge": (48, 4),
    "g5.48xlarge": (192, 8), "g6.xlarge": (4, 1), "g6.2xlarge": (8, 1), "g6.12xlarge": (48, 4),
}

# GCP accelerator type -> (GPU, compute capability)
GCP_GPUS: dict[str, tuple[str, tuple[int, int]]] = {
    "nvidia-tesla-k80": ("K80", (3, 7)), "nvidia-tesla-p4": ("P4", (6, 1)), "nvidia-tesla-p100": ("P100", (6, 0)),
    "nvidia-tesla-v100": ("V100", (7, 0)), "nvidia-tesla-t4": ("T4", (7, 5)), "nvidia-l4": ("L4", (8, 9)),
    "nvidia-tesla-a100": ("A100", (8, 0)), "nvidia-a100-80gb": ("A100", (8, 0)),
    "nvidia-h100-80gb": ("H100", (9, 0)),
}

# AWS Deep Learning AMI families (SSM public parameter names) -> the least NVIDIA driver
# branch their releases have shipped since 2025-10 (release notes: 580.95.05 in 2025-10,
# 595.91.07 in 2026-10); the x86_64 and arm64 builds share the driver.
DLAMI_DRIVERS: dict[str, int] = {
    "base-oss-nvidia-driver-gpu-ubuntu-22.04": 580,
    "base-oss-nvidia-driver-gpu-ubuntu-24.04": 580,
}

# Packages whose releases ship a build for an older glibc than the one pip picked on a newer
# machine (cryptography publishes manylinux_2_34 and manylinux_2_28 wheels): the older tag
# is what a node with that glibc installs. Any one of a wheel's own tags also suffices.
OLDER_BUILDS: dict[str, tuple[int, int]] = {"cryptography": (2, 28)}


@dataclass(frozen=True)
class ImageInfo:
    os: str
    driver: int | None  # NVIDIA driver branch the image ships (None: none, or not known)
    has_driver: bool  # the image family ships an NVIDIA driver at all
    source: str  # why we believe it


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


# ------------------------------------------------------------------ images
def _ray_default_amis() -> set[str]:
    """The AMI ids of Ray's DEFAULT_AMI table, read from its source (importing it needs boto3)."""
    import importlib.util

    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.origin:
        return set()
    src = Path(spec.origin).parent / "autoscaler" / "_private" / "aws" / "config.py"
    try:
        text = src.read_text()
    except OSError:
        return set()
    block = re.search(r"DEFAULT_AMI\s*=\s*\{(.*?)\}", text, re.S)
    return set(re.findall(r'"(ami-[0-9a-f]+)"', block.group(1))) if block else set()


def image_info(image: str, vouched: dict[str, str] | None = None) -> ImageInfo | None:
    """The OS (and NVIDIA driver) of an image id, SSM parameter or GCP image; None if unknown."""
    vouched = vouched or {}
    if image in vouched:
        return ImageInfo(_norm_os(vouched[image]), None, False, "--os")
    if image in ("", "latest_dlami") or image in _ray_default_amis():
        return ImageInfo("ubuntu18.04", 460, True, "Ray 2.60's default AWS image: Deep Learning AMI (Ubuntu 18.04) "
                                                   "V71.0, CUDA 11.2 drivers")
    m = re.match(r"resolve:ssm:/aws/service/deeplearning/ami/(?:x86_64|arm64)/([a-z0-9.\-]+)/", image)
    if m:
        ami_type = m.group(1)
        os_ = _os_from_name(ami_type)
        if os_ is None:
            return None
        if ami_type in DLAMI_DRIVERS:
            return ImageInfo(os_, DLAMI_DRIVERS[ami_type], True,
                             f"AWS Deep Learning AMI family {ami_type} (SSM public parameter)")
        return ImageInfo(os_, None, "nvidia-driver" in ami_type or "gpu" in ami_type,
                         f"AWS Deep Learning AMI family {ami_type} (SSM public parameter)")
    m = re.match(r"resolve:ssm:/aws/service/canonical/ubuntu/server/(\d\d\.\d\d)/", image)
    if m:
        return ImageInfo(f"ubuntu{m.group(1)}", None, False, "Canonical Ubuntu Server (SSM public parameter)")
    if "/global/images/" in image or image.startswith("projects/"):  # GCP image or image family
        name = image.rsplit("/", 1)[-1]
        os_ = _os_from_name(name)
        if os_ is None:
            return None
        drv = re.search(r"nvidia-(\d{3})", name)
        return ImageInfo(os_, int(drv.group(1)) if drv else None, drv is not None, f"GCP image {name}")
    return None


def _os_from_name(name: str) -> str | None:
    m = re.search(r"ubuntu-?(\d\d)\.?(\d\d)", name)
    if m:
        return f"ubuntu{m.group(1)}.{m.group(2)}"
    if "amazon-linux-2023" in name or "al2023" in name:
        return "amazonlinux2023"
    if "amazon-linux-2" in name:
        return "amazonlinux2"
    m = re.search(r"debian-(\d+)", name)
    return f"debian{m.group(1)}" if m else None


def _norm_os(text: str) -> str:
    t = text.lower().replace(" ", "").replace("-", "").replace("_", "")
    if t not in OS_GLIBC:
        raise ValueError(f"--os: unknown OS {text!r}; use one of {', '.join(OS_GLIBC)}")
    return t


# ------------------------------------------------------------------ wheels
def _glibc_of_tag(tag: str) -> tuple[int, int] | None:
    if "manylinux2014" in tag:
        return (2, 17)
    if "manylinux2010" in tag:
        return (2, 12)
    if "manylinux1" in tag:
        return (2, 5)
    m = re.search(r"manylinux_(\d+)_(\d+)", tag)
    return (int(m.group(1)), int(m.group(2))) if m else None


def pinned(constraints: Path) -> dict[str, str]:
    """name -> version of every ``name==version`` line of constraints.txt."""
    out = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, _, ver = line.partition("==")
            out[name.strip().lower()] = ver.strip()
    return out


def wheels_glibc(names: Sequence[str]) -> tuple[tuple[int, int], list[str]]:
    """The glibc the installed wheels of ``names`` need, and which packages need it."""
    need: dict[str, tuple[int, int]] = {}
    for name in names:
        try:
            text = md.distribution(name).read_text("WHEEL") or ""
        except md.PackageNotFoundError:
            continue
        tags = [g for line in text.splitlines() if line.startswith("Tag:")
                if (g := _glibc_of_tag(line.split(":", 1)[1])) is not None]
        if tags:
            need[name] = min([*tags, *([OLDER_BUILDS[name]] if name in OLDER_BUILDS else [])])
    if not need:
        return (2, 17), []
    top = max(need.values())
    return top, sorted(n for n, v in need.items() if v == top)


def torch_cuda(pins: dict[str, str]) -> int | None:
    """CUDA major of the pinned torch build (from its nvidia-cuda-runtime pin), None = CPU build."""
    for key in ("nvidia-cuda-runtime", "nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime-cu11", "cuda-toolkit"):
        if key in pins:
            major = pins[key].split(".", 1)[0]
            if key.endswith(("cu12", "cu11")):
                major = key[-2:]
            return int(major)
    return None


# ---------------------------------------------------------------- node types
def node_image(provider: str, node_config: dict[str, Any]) -> str | None:
    if provider == "aws":
        return str(node_config.get("ImageId", ""))
    if provider == "gcp":
        for disk in node_config.get("disks") or []:
            src = (disk.get("initializeParams") or {}).get("sourceImage")
            if src:
                return str(src)
        return ""
    return None


def node_gpu(provider: str, node_config: dict[str, Any]) -> tuple[str, tuple[int, int]] | None:
    if provider == "aws":
        family = str(node_config.get("InstanceType", "")).split(".", 1)[0]
        return AWS_GPUS.get(family)
    if provider == "gcp":
        for acc in node_config.get("guestAccelerators") or []:
            t = str(acc.get("acceleratorType", "")).rsplit("/", 1)[-1]
            if t in GCP_GPUS:
                return GCP_GPUS[t]
        mt = str(node_config.get("machineType", ""))
        if mt.startswith("g2-"):
            return GCP_GPUS["nvidia-l4"]
        if mt.startswith("a2-"):
            return GCP_GPUS["nvidia-tesla-a100"]
        if mt.startswith("a3-"):
            return GCP_GPUS["nvidia-h100-80gb"]
    return None


def _start_resources(commands: Sequence[Any]) -> dict[str, float]:
    """The custom resources a `ray start --resources=...` among ``commands`` advertises."""
    import json

    for c in commands or []:
        m = re.search(r"--resources[= ]'?(\{[^}]*\})", str(c))
        if m:
            try:
                return {k: float(v) for k, v in json.loads(m.group(1)).items()}
            except (ValueError, AttributeError):
                return {}
    return {}


def node_types(raw: dict[str, Any]) -> dict[str, dict]:
    """The node types of a cluster YAML; for a `local` provider, the head and the worker hosts
    (one type each, advertising what their `ray start --resources` says)."""
    if raw["provider"]["type"] != "local":
        return dict(raw.get("available_node_types") or {})
    return {
        "head (head_ip)": {"resources": _start_resources(raw.get("head_start_ray_commands")), "node_config": {}},
        "workers (worker_ips)": {"resources": _start_resources(raw.get("worker_start_ray_commands")),
                                 "node_config": {}},
    }


# ---------------------------------------------------------------- the check
def check_cluster(path: str | Path, *, configs: Sequence[Any] = (), constraints: str | Path | None = None,
                  vouched: dict[str, str] | None = None) -> Report:
    """Check one cluster YAML; ``configs`` are ExperimentConfig objects whose classes must be placeable."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    rep = Report()
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as err:
        rep.errors.append(f"{p}: cannot read it as YAML: {err}")
        return rep
    if not isinstance(raw, dict):
        rep.errors.append(f"{p}: a cluster config is a mapping (cluster_name, provider, available_node_types, ...)")
        return rep
    try:
        logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # its INFO lines are noise here
        validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` does
        rep.notes.append("Ray's cluster schema: ok")
    except Exception as err:  # noqa: BLE001 - jsonschema, ValueError, KeyError: all say what is wrong
        msg = getattr(err, "message", None) or str(err)
        rep.errors.append(f"Ray's cluster schema rejects {p}: {msg.splitlines()[0] if msg else type(err).__name__}")
        return rep

    provider = str(raw["provider"]["type"])
    types = node_types(raw)
    from cafe_ray.cluster.images import pinned_sources

    pins_from = pinned_sources(p.read_text())  # ami ids that `cluster pin-image` wrote, with their source
    constraints = Path(constraints) if constraints else p.resolve().parent / "constraints.txt"
    if not constraints.is_file():
        rep.errors.append(f"{constraints}: not found; pass --constraints (the repo's constraints.txt)")
        return rep
    pins = pinned(constraints)
    need_glibc, needers = wheels_glibc(list(pins))
    cuda = torch_cuda(pins)
    vouched = {k: v for k, v in (vouched or {}).items()}
    rep.notes.append(f"pinned wheels need glibc >= {need_glibc[0]}.{need_glibc[1]} "
                     f"({', '.join(needers[:4]) or 'none'}); torch {pins.get('torch', '?')} is a "
                     + (f"CUDA {cuda} build" if cuda else "CPU build"))

    # images: OS / glibc, and the driver for GPU node types
    for name, nt in types.items():
        cfgn = nt.get("node_config") or {}
        gpu = node_gpu(provider, cfgn)
        image = node_image(provider, cfgn)
        if image is None:  # local provider: on-prem hosts, no image
            key = "hosts"
            if key not in vouched:
                msg = ("on-prem hosts have no image to read their OS from; run `ldd --version` on them and "
                       "pass --os hosts=ubuntu22.04 (or their OS)")
                if msg not in rep.errors:
                    rep.errors.append(msg)
                continue
            info = ImageInfo(_norm_os(vouched[key]), None, False, "--os hosts=")
        else:
            info = image_info(image if image in vouched else pins_from.get(image, image), vouched)
            if info is None:
                rep.errors.append(f"node type {name!r}: unknown image {image!r}: cannot tell its OS and glibc. Use a "
                                  "known image family (see docs/scale-out.md) or vouch for it with "
                                  f"--os '{image}=ubuntu22.04' (its OS)")
                continue
        glibc = OS_GLIBC[info.os]
        shown = "the hosts" if image is None else f"image {image!r}" if image else "Ray's default image (no ImageId)"
        if glibc < need_glibc:
            rep.errors.append(
                f"node type {name!r}: {shown} is {info.os} (glibc {glibc[0]}.{glibc[1]}; {info.source}), but "
                f"the pinned wheels need glibc >= {need_glibc[0]}.{need_glibc[1]} ({', '.join(needers[:4])}): "
                "`pip install -c constraints.txt` fails there. Use an Ubuntu 22.04/24.04 image, e.g. ImageId: "
                "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id")
        else:
            rep.notes.append(f"node type {name!r}: {info.os} (glibc {glibc[0]}.{glibc[1]}) from {info.source}: ok")
        if gpu is None:
            continue
        gpu_name, cc = gpu
        if cuda is None:
            rep.errors.append(
                f"node type {name!r} has a {gpu_name} GPU, but the pinned torch {pins.get('torch', '?')} is a CPU "
                f"build ({constraints.name} pins no CUDA runtime): its GPU actors would train on the CPU. Pin "
                "torch's CUDA build (its nvidia-* wheels) in constraints.txt, or use a CPU instance type")
            continue
        min_driver, min_cc = CUDA_NEEDS.get(cuda, (0, (0, 0)))
        if cc < min_cc:
            rep.errors.append(f"node type {name!r}: {gpu_name} (compute capability {cc[0]}.{cc[1]}) is not supported "
                              f"by the pinned torch CUDA {cuda} build (needs >= {min_cc[0]}.{min_cc[1]}); use e.g. "
                              "g4dn/g5/g6 (AWS) or nvidia-tesla-t4/nvidia-l4 (GCP)")
        if provider == "local":
            rep.warnings.append(f"node type {name!r}: check the hosts' NVIDIA driver is >= {min_driver} "
                                f"(`nvidia-smi`) for torch's CUDA {cuda} build")
        elif not info.has_driver:
            rep.errors.append(f"node type {name!r} has a {gpu_name} GPU but {shown} ships no NVIDIA driver; "
                              f"use an image with driver >= {min_driver}, e.g. the Deep Learning Base OSS Nvidia "
                              "Driver GPU AMI (Ubuntu 22.04)")
        elif info.driver is not None and info.driver < min_driver:
            rep.errors.append(f"node type {name!r}: {shown} ships NVIDIA driver {info.driver}, but torch's "
                              f"CUDA {cuda} build needs >= {min_driver}; use an image with a newer driver")
        elif info.driver is None:
            rep.warnings.append(f"node type {name!r}: the driver version of {shown} is not pinned by its name; "
                                f"torch's CUDA {cuda} build needs >= {min_driver} (the node's setup checks "
                                "torch.cuda.is_available() and fails loudly otherwise)")

    if provider == "aws":
        _check_worker_images(raw, p, rep)

    # setup: the project installed the way `make install` does (or from the head's wheel cache)
    setup = [str(c) for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
             for c in (raw.get(key) or [])]
    if not any("make install" in c or "-c constraints.txt" in c or "setup-node" in c for c in setup):
        rep.errors.append("setup_commands: no command installs the project with the pinned constraints; add "
                          "`cd ~/cafe-ray && make install` (or pip install -c constraints.txt -e .)")

    # device classes: every custom resource advertised by some node type; GPUs somewhere
    for cfg in configs:
        rep.errors.extend(check_classes(cfg, types, provider))
    if configs and not rep.errors:
        rep.notes.append("every device class of the given config(s) can be placed on some node type")
        if provider == "aws":
            for cfg in configs:
                _size_pools(cfg, raw, rep)
    return rep


def pool_nodes(cfg: Any, raw: dict[str, Any]) -> dict[str, int]:
    """Worker type -> the fewest nodes of it that host every pinned pool of ``cfg`` at full size.

    A pool goes to the worker type that advertises its custom resources; per type, the pools'
    summed bundles over one node's resources (vCPUs and GPUs of the instance type plus its
    ``resources``), rounded up. Unpinned pools are left out (they go wherever there is room).
    """
    import math

    from cafe_ray.sim.autoscale import actor_bundle
    from cafe_ray.sim.profiles import resolve_catalog

    types = raw.get("available_node_types") or {}
    head = raw.get("head_node_type")
    need: dict[str, dict[str, float]] = {}
    for c in resolve_catalog(cfg.profiles).classes:
        b = {r: v for r, v in actor_bundle(c).items() if r != "memory"}
        custom = [r for r in b if r not in ("CPU", "GPU")]
        host = next((n for n, t in types.items() if n != head and custom
                     and all(float((t.get("resources") or {}).get(r, 0)) > 0 for r in custom)), None)
        if host is None:
            continue
        tot = need.setdefault(host, {})
        for r, v in b.items():
            tot[r] = tot.get(r, 0.0) + v * (c.actors or 1)
    out = {}
    for host, tot in need.items():
        nt = types[host]
        cpus, gpus = AWS_SIZES.get(str((nt.get("node_config") or {}).get("InstanceType")), (0, 0))
        node = {"CPU": float(cpus), "GPU": float(gpus), **{k: float(v) for k, v in (nt.get("resources") or {}).items()}}
        if not cpus:
            continue  # an instance type the table does not know: no estimate
        out[host] = max(math.ceil(v / node[r] - 1e-9) for r, v in tot.items() if node.get(r))
    return out


def _size_pools(cfg: Any, raw: dict[str, Any], rep: Report) -> None:
    """Say how many nodes the pools fill, and warn when max_workers cannot reach that."""
    nodes = pool_nodes(cfg, raw)
    if not nodes:
        return
    types = raw.get("available_node_types") or {}
    shown = ", ".join(f"{n} x{k} (max_workers {types[n].get('max_workers', '?')})" for n, k in sorted(nodes.items()))
    rep.notes.append(f"{cfg.name}: its pinned pools fill {shown}: {sum(nodes.values()) + 1} nodes with the head")
    for n, k in sorted(nodes.items()):
        cap = types[n].get("max_workers")
        if cap is not None and k > int(cap):
            rep.warnings.append(f"{cfg.name}: its pools need {k} {n} nodes but {n}.max_workers is {cap}: the pools "
                                f"are shrunk to fit; raise available_node_types.{n}.max_workers to {k}")
    total = raw.get("max_workers")
    if total is not None and sum(nodes.values()) > int(total):
        rep.warnings.append(f"{cfg.name}: its pools need {sum(nodes.values())} worker nodes but max_workers is "
                            f"{total}: raise the top-level max_workers to {sum(nodes.values())}")


def _check_worker_images(raw: dict[str, Any], path: Path, rep: Report) -> None:
    """Worker ``resolve:ssm:`` images are resolved with the head's instance profile at launch."""
    types = raw.get("available_node_types") or {}
    head = raw.get("head_node_type")
    head_cfg = (types.get(head) or {}).get("node_config") or {}
    head_image = str(head_cfg.get("ImageId", ""))
    profile = head_cfg.get("IamInstanceProfile")
    pins_at_boot = any("pin-image" in str(c) and "--from-instance" in str(c)
                       for c in raw.get("head_setup_commands") or [])
    for name, nt in types.items():
        image = str((nt.get("node_config") or {}).get("ImageId", ""))
        if name == head or not image.startswith("resolve:ssm:"):
            continue
        if pins_at_boot and image == head_image:
            rep.notes.append(f"node type {name!r}: {image[:40]}... is pinned at bring-up to the head's own AMI "
                             "(head_setup_commands: cluster pin-image --from-instance): no SSM permission needed")
        elif profile:
            rep.warnings.append(f"node type {name!r}: its image is resolved at launch with the head's instance "
                                f"profile {profile}; its role must allow ssm:GetParameters on "
                                f"{image[len('resolve:ssm:'):]} (docs/scale-out.md has the policy)")
        else:
            rep.errors.append(
                f"node type {name!r}: ImageId {image} is resolved by whoever launches the node, and workers are "
                "launched by the head's autoscaler under Ray's default instance profile, which has no "
                "ssm:GetParameters: every launch would be refused. Write the AMI id in with `cafe-ray cluster "
                f"pin-image {path}`, or add `cafe-ray cluster pin-image ~/ray_bootstrap_config.yaml "
                "--from-instance` to head_setup_commands (workers then boot the head's image)")


def check_classes(cfg: Any, types: dict[str, dict], provider: str = "aws") -> list[str]:
    """Errors for device classes of ``cfg`` that no node type can host."""
    from cafe_ray.sim.autoscale import actor_bundle
    from cafe_ray.sim.profiles import resolve_catalog

    errors = []
    for c in resolve_catalog(cfg.profiles).classes:
        need = {r: v for r, v in actor_bundle(c).items() if r not in ("CPU", "memory")}
        hosts = []
        for name, nt in types.items():
            res = {k: float(v) for k, v in (nt.get("resources") or {}).items()}
            if "GPU" not in res and (provider == "local" or node_gpu(provider, nt.get("node_config") or {})):
                res["GPU"] = 1.0  # Ray detects the instance's (or on-prem host's) GPUs
            if all(res.get(r, 0.0) + 1e-9 >= v for r, v in need.items()):
                hosts.append(name)
        if not hosts:
            missing = sorted(r for r in need if not any(
                float((nt.get("resources") or {}).get(r, 0)) > 0
                or (r == "GPU" and node_gpu(provider, nt.get("node_config") or {}) is not None)
                for nt in types.values()))
            what = ", ".join(f"{r}: {need[r]:g}" for r in (missing or sorted(need)))
            where = ("`ray start --resources` in worker_start_ray_commands" if provider == "local"
                     else "a worker type's `resources` in the cluster YAML")
            errors.append(f"{cfg.name}: device class {c.name!r} asks for {{{what}}} per actor "
                          f"(profiles.classes.{c.name}), but no node type advertises it; add it to {where}, "
                          f"or change profiles.classes.{c.name}.resources")
    return errors
