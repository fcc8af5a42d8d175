#!/usr/bin/env bash
# Bring-up of one node of a cafe-ray cluster (cluster.yaml runs it; docs/scale-out.md explains it).
#
#   setup-node.sh head      the head: apt packages (NFS server), Python 3.11, the wheel cache in
#                           $SHARED/wheels (both torch builds), then its own install from that cache
#   setup-node.sh worker    a worker: apt packages (NFS client), mounts the head's $SHARED, Python 3.11,
#                           then installs from the head's wheel cache (no package index when it is there)
#   setup-node.sh install SET WHEELS VENV
#                           only the install step: SET is cuda or cpu (what docs/scale-out.md times)
#   setup-node.sh wait-apt  wait until no apt/dpkg process holds the package locks (first boot)
#
# A node with an NVIDIA GPU installs torch's CUDA build (constraints.txt); every other node the
# CPU build of the same version (PyTorch's CPU index: no multi-GB CUDA wheels).
set -euo pipefail

REPO=${CAFE_RAY_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
SHARED=${CAFE_RAY_SHARED:-$HOME/cafe-shared}
WHEELS=${CAFE_RAY_WHEELS:-$SHARED/wheels}
CONSTRAINTS=${CAFE_RAY_CONSTRAINTS:-$REPO/constraints.txt}
CPU_INDEX=${CAFE_RAY_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
APT_LOCKS=${APT_LOCKS:-/var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock}
APT_WAIT_S=${APT_WAIT_S:-900}
SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)

log() { echo "[setup-node $(date +%H:%M:%S)] $*"; }

# Fresh Ubuntu instances run apt (cloud-init, unattended-upgrades) for minutes after boot:
# wait for the locks instead of failing `ray up` with "Could not get lock".
wait_apt() {
  local waited=0
  # shellcheck disable=SC2086 # APT_LOCKS is a list
  while $SUDO fuser $APT_LOCKS >/dev/null 2>&1; do
    if [ "$waited" -ge "$APT_WAIT_S" ]; then
      log "apt/dpkg still locked after ${APT_WAIT_S}s: $($SUDO fuser -v $APT_LOCKS 2>&1 | tail -n +2 | tr -s ' ')"
      return 1
    fi
    [ $((waited % 30)) = 0 ] && log "waiting for another apt/dpkg to finish (${waited}s)"
    sleep 3
    waited=$((waited + 3))
  done
}

apt_install() {
  wait_apt
  local opts=(-o DPkg::Lock::Timeout="$APT_WAIT_S" -qq)
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get "${opts[@]}" update
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get "${opts[@]}" install -y "$@"
}

vpc_cidr() {  # this instance's VPC address range, from the instance metadata (IMDSv2)
  local md=${CAFE_RAY_IMDS_URL:-http://169.254.169.254} t mac
  t=$(curl -sf -m 2 -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 60" "$md/latest/api/token") || return 1
  mac=$(curl -sf -m 2 -H "X-aws-ec2-metadata-token: $t" "$md/latest/meta-data/mac") || return 1
  curl -sf -m 2 -H "X-aws-ec2-metadata-token: $t" "$md/latest/meta-data/network/interfaces/macs/$mac/vpc-ipv4-cidr-block"
}

torch_set() {  # cuda on a node whose GPU the driver shows, cpu elsewhere
  if nvidia-smi -L >/dev/null 2>&1; then echo cuda; else echo cpu; fi
}

python311() {  # the tested Python, from uv (Ubuntu 22.04's own python3 is 3.10)
  local uv=$HOME/.local/bin/uv
  command -v uv >/dev/null && uv=$(command -v uv)
  [ -x "$uv" ] || curl -LsSf https://astral.sh/uv/install.sh | sh >/dev/null
  "$uv" python find 3.11 2>/dev/null || { "$uv" python install 3.11 >/dev/null && "$uv" python find 3.11; }
}

requirements() {  # the project's runtime dependencies, one a line (pyproject.toml)
  "$1" -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
    "$REPO/pyproject.toml"
}

# Download both wheel sets once, on the head (the cache lies on the NFS export every worker mounts).
build_cache() {
  local py=$1 set dir extra
  for set in cuda cpu; do
    dir=$WHEELS/$set
    [ -f "$dir/.complete" ] && continue
    mkdir -p "$dir"
    extra=()
    [ "$set" = cpu ] && extra=(--extra-index-url "$CPU_INDEX")
    log "wheel cache: downloading the $set set into $dir"
    "$py" -m pip download -q -d "$dir" "${extra[@]}" -c "$CONSTRAINTS" \
      -r <(requirements "$py") setuptools wheel
    touch "$dir/.complete"
  done
}

install_set() {  # SET WHEELS VENV [PYTHON]
  local set=$1 wheels=$2 venv=$3 py=${4:-python3} src
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  if [ -f "$wheels/$set/.complete" ]; then
    src=(--no-index --find-links "$wheels/$set")  # the head's cache: no index round trips
  elif [ "$set" = cpu ]; then
    src=(--extra-index-url "$CPU_INDEX")
  else
    src=()
  fi
  log "installing the $set set into $venv (${src[*]:-from the package index})"
  "$venv/bin/pip" install -q "${src[@]}" -c "$CONSTRAINTS" -e "$REPO"
}

finish() {  # PATH for ray start/exec/attach; on a GPU node, fail loudly when torch cannot see the GPU
  local venv=$REPO/.venv
  grep -q 'cafe-ray/.venv/bin' "$HOME/.bashrc" 2>/dev/null || echo "export PATH=\"$venv/bin:\$PATH\"" >> "$HOME/.bashrc"
  if [ "$(torch_set)" = cuda ]; then
    "$venv/bin/python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'torch ' + \
torch.__version__ + ' sees no GPU: the NVIDIA driver is older than its CUDA ' + str(torch.version.cuda) + ' build needs')"
  fi
}

case "${1:-}" in
  head)
    apt_install make nfs-kernel-server
    mkdir -p "$SHARED"
    clients=${NFS_CLIENTS:-$(vpc_cidr || echo "172.16.0.0/12 10.0.0.0/8")}  # the nodes' VPC only
    line="$SHARED"
    for c in $clients; do line="$line $c(rw,sync,no_subtree_check,no_root_squash)"; done
    grep -q cafe-shared /etc/exports || echo "$line" | $SUDO tee -a /etc/exports >/dev/null
    $SUDO exportfs -ra
    PY=$(python311)
    [ -x "$REPO/.venv/bin/python" ] || "$PY" -m venv "$REPO/.venv"
    build_cache "$REPO/.venv/bin/python"
    install_set "$(torch_set)" "$WHEELS" "$REPO/.venv" "$PY"
    finish
    ;;
  worker)
    apt_install make nfs-common
    mkdir -p "$SHARED"
    mountpoint -q "$SHARED" || $SUDO mount -t nfs -o vers=4 "${RAY_HEAD_IP:?set by Ray}:$SHARED" "$SHARED"
    install_set "$(torch_set)" "$WHEELS" "$REPO/.venv" "$(python311)"
    finish
    ;;
  install)
    install_set "${2:?cuda or cpu}" "${3:?wheel cache folder}" "${4:?venv folder}" "${5:-python3}"
    ;;
  wait-apt)
    wait_apt
    ;;
  *)
    echo "usage: $0 head | worker | install SET WHEELS VENV [PYTHON] | wait-apt" >&2
    exit 2
    ;;
esac
