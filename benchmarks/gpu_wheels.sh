#!/usr/bin/env bash
# The wheels benchmarks/gpu_suite.sh installs on the GPU machine, downloaded (and built) here into .whl/.
#
#   bash benchmarks/gpu_wheels.sh            # download + build into .whl/, check, print the sizes
#   bash benchmarks/gpu_wheels.sh --check    # only check what .whl/ holds (no network)
#
# The GPU machine (/work/.library/device/KINDS.md, nvidia-h200) runs its own python3 (3.12, x86_64) with torch
# 2.11 (CUDA 13), triton and transformers already installed, and has no network. Kiln's trainer also needs
# megatron-core and deepspeed, and deepspeed needs hjson and pydantic 2 (pydantic-core, annotated-types,
# typing-inspection, a typing-extensions >= 4.16), which that image lacks; and `kiln train` needs orjson (a
# data-extra package: kiln.cli registers the data commands, and kiln.data_pipeline.filters imports
# filters/training.py, which imports orjson at module level). Everything else the trainer imports is in the image
# (DEVICE_PACKAGES below, copied from KINDS.md's list of 2026-11-17). Versions are constraints.txt's.
#
# megatron-core and pydantic-core are compiled: downloaded for CPython 3.12 manylinux x86_64 whatever this
# machine runs. deepspeed is published as a source distribution only: built here with DS_BUILD_OPS=0 into a
# pure-Python wheel (no precompiled ops; kiln's engine uses torch's AdamW, so none is needed).
#
# The check (also what --check does): one version of each distribution, each wheel's tag installable by
# CPython 3.12 on manylinux x86_64, every requirement of every wheel either carried (and its version allowed)
# or in the image. Then the total size, which together with the working tree must stay under the device tool's
# 64 MiB per call. .whl/ is ignored through .git/info/exclude and never committed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
WHL=$REPO/.whl
PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3
MODE=${1:-download}
case "$MODE" in
  download | --check) ;;
  -h | --help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: bash benchmarks/gpu_wheels.sh [--check]" >&2; exit 2 ;;
esac

# distributions to carry: name (as in constraints.txt) and how to get it
BINARY=(megatron-core pydantic pydantic_core annotated-types typing-inspection typing_extensions hjson orjson)
BUILT=(deepspeed)

pin() {  # the version constraints.txt pins for distribution $1 (names compared normalised, PEP 503)
  local want line
  want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  while IFS= read -r line; do
    case "$line" in '#'* | '') continue ;; esac
    if [ "$(echo "${line%%==*}" | tr 'A-Z_.' 'a-z--')" = "$want" ]; then
      echo "${line#*==}"
      return 0
    fi
  done <"$REPO/constraints.txt"
  echo "gpu_wheels.sh: $1 is not pinned in constraints.txt" >&2
  return 1
}

if [ "$MODE" = download ]; then
  mkdir -p "$REPO/.git/info"
  grep -qxF '/.whl/' "$REPO/.git/info/exclude" 2>/dev/null || echo '/.whl/' >>"$REPO/.git/info/exclude"
  mkdir -p "$WHL"
  rm -f "$WHL"/*.whl  # one version of each: a stale second one would stop the whole install there
  specs=()
  for name in "${BINARY[@]}"; do specs+=("$name==$(pin "$name")"); done
  echo "downloading for CPython 3.12 manylinux x86_64: ${specs[*]}"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$WHL" "${specs[@]}"
  for name in "${BUILT[@]}"; do
    spec="$name==$(pin "$name")"
    echo "building $spec (sdist only) into a pure-Python wheel, DS_BUILD_OPS=0"
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$WHL" "$spec"
  done
fi

[ -d "$WHL" ] && ls "$WHL"/*.whl >/dev/null 2>&1 || { echo "gpu_wheels.sh: no wheels in $WHL (run: bash benchmarks/gpu_wheels.sh)" >&2; exit 1; }

# the packages the GPU image already holds (KINDS.md, "Python packages already there", read 2026-11-17)
DEVICE_PACKAGES="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"

DEVICE_PACKAGES="$DEVICE_PACKAGES" "$PY" - "$WHL" <<'EOF'
import os
import re
import sys
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.tags import parse_tag
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # a bare python3: pip's vendored copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.tags import parse_tag  # noqa: F401
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

whl = Path(sys.argv[1])
device = {canonicalize_name(n) for n in os.environ["DEVICE_PACKAGES"].split()}
# the GPU machine: CPython 3.12 on Linux x86_64 (KINDS.md), glibc >= 2.28 assumed for manylinux tags
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "os_name": "posix", "extra": ""}
problems, carried = [], {}
for path in sorted(whl.glob("*.whl")):
    name, version, _, tags = parse_wheel_filename(path.name)
    if name in carried:
        problems.append(f"two versions of {name}: {carried[name][0]} and {version} (the install there stops)")
    ok_tag = False
    for t in tags:
        plat_ok = t.platform == "any" or re.fullmatch(r"manylinux(1|2010|2014|_2_(\d+))_x86_64", t.platform) and (
            not t.platform.startswith("manylinux_2_") or int(t.platform.split("_")[2]) <= 28)
        abi_ok = t.abi in ("none", "abi3", "cp312")
        interp_ok = t.interpreter in ("py3", "cp312") or (t.abi == "abi3" and t.interpreter.startswith("cp3")
                                                          and int(t.interpreter[3:]) <= 12)
        ok_tag = ok_tag or bool(plat_ok and abi_ok and interp_ok)
    if not ok_tag:
        problems.append(f"{path.name}: no tag CPython 3.12 on manylinux x86_64 (glibc 2.28) can install")
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        reqs = [line.split(":", 1)[1].strip() for line in z.read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    carried[name] = (version, reqs, path.stat().st_size)
print(f"{'wheel':<40} {'version':<10} {'MiB':>6}  requirements (carried = in .whl/, image = in the GPU image)")
for name, (version, reqs, size) in carried.items():
    needs = []
    for text in reqs:
        r = Requirement(text)
        if r.marker is not None and not r.marker.evaluate(env):
            continue  # an extra, or another platform / Python
        dep = canonicalize_name(r.name)
        if dep in carried:
            have = carried[dep][0]
            if r.specifier and not r.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {text}, .whl/ has {dep} {have}")
            needs.append(f"{dep} (carried {have})")
        elif dep in device:
            needs.append(f"{dep}{r.specifier} (image)")
        else:
            problems.append(f"{name} needs {text}: neither carried nor in the GPU image")
            needs.append(f"{dep} MISSING")
    print(f"{name:<40} {str(version):<10} {size / 2**20:>6.2f}  {', '.join(needs) or '-'}")
if problems:
    print("\n".join(["PROBLEMS:", *problems]))
    sys.exit(1)
print(f"ok: {len(carried)} wheels, one version each, installable by CPython 3.12 manylinux x86_64, requirements met")
EOF

# sizes: the wheels, and what travels with each call (tracked + untracked-not-ignored files + the carried .whl)
whl_bytes=$(du -cb "$WHL"/*.whl | tail -1 | cut -f1)
tree_bytes=$(git -C "$REPO" ls-files -z -co --exclude-standard | (cd "$REPO" && xargs -0 -r stat -c %s 2>/dev/null || true) | awk '{s += $1} END {print s + 0}')
total=$((whl_bytes + tree_bytes))
limit=$((64 * 1024 * 1024))
awk -v w="$whl_bytes" -v t="$tree_bytes" -v s="$total" 'BEGIN {
  printf "wheels %.2f MiB + working tree %.2f MiB = %.2f MiB travelling per call (limit 64 MiB)\n", w / 2^20, t / 2^20, s / 2^20 }'
if [ "$total" -ge "$limit" ]; then
  echo "gpu_wheels.sh: over the device tool's 64 MiB per call" >&2
  exit 1
fi
