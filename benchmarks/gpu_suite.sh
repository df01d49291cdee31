#!/usr/bin/env bash
# The GPU validation suite (issue 11): kernel tests on CUDA, kernel benchmarks, a ~1B Llama through our trainer.
#
#   bash benchmarks/gpu_suite.sh $OUT                      # on the GPU machine, from the repo root (<= 8 min)
#   bash benchmarks/gpu_suite.sh --dry-run [DIR]           # here, on CPU: every step's CPU-checkable part
#   bash benchmarks/gpu_suite.sh $OUT --only kernels_bench,train_paired   # some steps again (setup always runs)
#   bash benchmarks/gpu_suite.sh $OUT --budget 300         # another total budget (s; default 465, dry run 1800)
#
# On the device (the `run` tool: carry [".whl"], command `bash benchmarks/gpu_suite.sh $OUT`, timeout_s 540;
# benchmarks/gpu_wheels.sh fills .whl/ here first). Steps, each under its own `timeout` and all under one
# deadline, so that one failure or hang loses only its own step; summary.json is rewritten after every step:
#   setup          install .whl/ into /tmp/site (megatron-core, deepspeed, pydantic, hjson), put a kiln package
#                  mapping onto this checkout first on PYTHONPATH, print versions and nvidia-smi, import the
#                  trainer, measure the bf16 matmul and copy ceilings                       -> setup.log
#   memory_plan    kiln train recipes/pretrain/llama_1b_1gpu.yaml --dry-run --world-size 1 -> setup.log
#   kernel_tests   tests/test_kernels.py with KILN_KERNEL_TEST_DEVICE=cuda (compiled Triton, fp32 + bf16, fwd +
#                  bwd)                                                                    -> kernel_tests.log
#   kernels_bench  benchmarks/kernels.py --device cuda: float64 correctness check, attention vs SDPA backends,
#                  fused kernels vs eager and torch.compile                   -> kernels.json, kernels.log
#   train_fused    kiln train llama_1b_1gpu (fused kernels on), 20 steps: our console line + peak memory
#   train_paired   benchmarks/train.py --gpu: the trainer vs a plain PyTorch loop of the same model, paired steps
#                                                                                 -> train.json
#   train_unfused  kiln train llama_1b_1gpu model.fused_kernels=false         (all three: -> train.log)
#   (summary)      summary.json: every step's status and the headline figures with their goals
# $OUT gets 7 files: summary.json setup.log kernel_tests.log kernels.json kernels.log train.json train.log.
#
# --dry-run (CPU, here, no GPU): the same steps as far as a CPU takes them: the wheels in .whl/ checked and
# installed for CPython 3.12 into a scratch target (skipped when .whl/ is absent, as in CI), the kiln mapping,
# the imports with every package that is not in the GPU image blocked, the memory plan (< 139 GiB), a few
# kernel tests through the same command line, the kernel benchmark's GPU plan at tiny shapes
# (benchmarks/kernels.py --dry-run), and the three training runs with the recipe shrunk to a tiny model.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$PWD

usage() { sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
DRY=0 ONLY="" BUDGET=${KILN_GPU_SUITE_BUDGET_S:-} OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY=${2:?--only needs a comma-separated list of steps}; shift ;;
    --only=*) ONLY=${1#--only=} ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    --budget=*) BUDGET=${1#--budget=} ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "gpu_suite.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "gpu_suite.sh: one output folder only" >&2; exit 2; }; OUT=$1 ;;
  esac
  shift
done
STEPS="setup memory_plan kernel_tests kernels_bench train_fused train_paired train_unfused"
for s in ${ONLY//,/ }; do
  case " $STEPS " in *" $s "*) ;; *) echo "gpu_suite.sh: unknown step $s (steps: $STEPS)" >&2; exit 2 ;; esac
done
[ -n "$BUDGET" ] || { [ "$DRY" = 1 ] && BUDGET=1800 || BUDGET=465; }
case "$BUDGET" in '' | *[!0-9]*) echo "gpu_suite.sh: --budget must be whole seconds" >&2; exit 2 ;; esac

START=$(date +%s)
DEADLINE=$((START + BUDGET))
RESERVE=8  # seconds kept for the last summary
if [ "$DRY" = 1 ]; then
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/kiln-gpu-suite-dry.XXXXXX")
  OUT=${OUT:-$WORK/out}
  PY=${PYTHON:-$REPO/.venv/bin/python}
  [ -x "$PY" ] || PY=python3
  PYTEST=("$REPO/.venv/bin/pytest")
  [ -x "${PYTEST[0]}" ] || PYTEST=("$PY" -m pytest)
else
  [ -n "$OUT" ] || { echo "gpu_suite.sh: give the output folder (\$OUT on the GPU machine) or --dry-run" >&2; exit 2; }
  WORK=/tmp/kiln-gpu-suite  # its Triton and inductor caches stay for a rerun on the same (warm) machine
  rm -rf "$WORK/site" "$WORK/shim" "$WORK"/run-*
  PY=${PYTHON:-python3}
  PYTEST=("$PY" -m pytest)
fi
mkdir -p "$OUT" "$WORK" || exit 2
OUT=$(cd "$OUT" && pwd)
# a dry run's scratch folder goes at the end, unless the output lives in it (or KILN_GPU_SUITE_KEEP=1)
case "$OUT/" in "$WORK"/*) ;; *) [ "$DRY" = 1 ] && [ "${KILN_GPU_SUITE_KEEP:-0}" != 1 ] && trap 'rm -rf "$WORK"' EXIT ;; esac
STATUS=$WORK/status.tsv
: >"$STATUS"

# one environment for every step: the carried wheels and the kiln mapping first on the path; no network, no
# interpreter; PYTHONSAFEPATH so that no step puts the repo root (whose kiln/ holds only the core modules) first
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR=$WORK/triton-cache TORCHINDUCTOR_CACHE_DIR=$WORK/inductor-cache
unset TRITON_INTERPRET
SITE=$WORK/site SHIM=$WORK/shim
export REPO WORK SITE SHIM PY  # the setup functions run in `bash -c` under timeout
if [ "$DRY" = 1 ]; then
  export DS_ACCELERATOR=cpu
  export PYTHONPATH=$SHIM${PYTHONPATH:+:$PYTHONPATH}
else
  export DS_ACCELERATOR=cuda
  export PYTHONPATH=$SITE:$SHIM${PYTHONPATH:+:$PYTHONPATH}
fi
# --dry-run: for the steps that import the trainer, a sitecustomize that refuses what the GPU image lacks
BLOCK=$WORK/blocker

# -------------------------------------------------------------------------------------------------------------
# helper programs (written into $WORK, run with the device's python3)

cat >"$WORK/setup_check.py" <<'EOF'
"""Versions, the trainer's imports, and (on CUDA) the bf16 matmul and device-copy ceilings."""
import importlib
import json
import os
import platform
import sys
import time

info = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
        "cpus": os.cpu_count(), "imports": {}}
import torch  # noqa: E402

info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
for mod in ("triton", "transformers", "deepspeed", "megatron.core", "pydantic", "numpy", "yaml", "rich"):
    try:
        info[mod] = getattr(importlib.import_module(mod), "__version__", "?")
    except Exception as e:  # noqa: BLE001
        info[mod] = f"IMPORT FAILED: {type(e).__name__}: {e}"
for mod in ("deepspeed", "megatron.core.parallel_state", "megatron.core.tensor_parallel", "kiln", "kiln.cli",
            "kiln.kernels", "kiln.pretrain.model", "kiln.pretrain.train", "kiln.pretrain.engine",
            "kiln.parallel.topology", "kiln.parallel.parallelize", "kiln.pretrain.engine.zero",
            "kiln.pretrain.callbacks.flops"):
    try:
        m = importlib.import_module(mod)
        info["imports"][mod] = "ok"
    except Exception as e:  # noqa: BLE001
        info["imports"][mod] = f"FAILED: {type(e).__name__}: {e}"
import kiln  # noqa: E402

info["kiln_file"] = kiln.__file__
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1))
    try:
        n = 8192
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        info["bf16_matmul_tflops"] = round(2 * n**3 * 10 / (time.perf_counter() - t) / 1e12, 1)
        x = torch.empty(2**30, dtype=torch.float32, device="cuda").normal_()
        y = torch.empty_like(x)
        y.copy_(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            y.copy_(x)
        torch.cuda.synchronize()
        info["copy_tb_s"] = round(2 * x.numel() * 4 * 5 / (time.perf_counter() - t) / 1e12, 2)  # read + write
        del a, b, x, y
    except Exception as e:  # noqa: BLE001
        info["ceilings"] = f"FAILED: {type(e).__name__}: {e}"
print("SETUP_RESULT " + json.dumps(info), flush=True)
failed = [m for m, v in info["imports"].items() if v != "ok"]
if failed:
    print("imports failed: " + ", ".join(failed), file=sys.stderr)
    sys.exit(1)
EOF

cat >"$WORK/kiln_train.py" <<'EOF'
"""`kiln train ...` (kiln.cli.main, what the console script runs), then its peak GPU memory on one line."""
import json
import sys
import time

t0 = time.time()
from kiln.cli import main  # noqa: E402

rc = main(sys.argv[1:])
info = {"rc": rc, "seconds": round(time.time() - t0, 1)}
import torch  # noqa: E402

if torch.cuda.is_available():
    info.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))
print("KILN_TRAIN_RESULT " + json.dumps(info), flush=True)
sys.exit(rc)
EOF

mkdir -p "$BLOCK"
cat >"$BLOCK/sitecustomize.py" <<'EOF'
"""--dry-run only: make every distribution the GPU image lacks (KINDS.md) and .whl/ does not carry look absent (the
finders return None, as there: `import` raises ModuleNotFoundError, importlib.util.find_spec returns None), so a
CPU run shows that the suite's code needs nothing else. Blocked names are appended to $KILN_BLOCK_LOG: either
optional imports (the code goes on without them, as it will there) or needs of this machine's newer versions of
packages the image has in another version (huggingface_hub 2 here needs httpx2; the image's 1.x does not)."""
import importlib.machinery
import os
import re
import sys

_allowed = {re.sub(r"[-_.]+", "-", n).lower() for n in os.environ.get("KILN_DEVICE_DISTS", "").split()}
_dists = None


def _blocked(fullname):
    global _dists
    top = fullname.partition(".")[0]
    if top != fullname or top.startswith("_") or top in sys.stdlib_module_names or top in sys.modules:
        return False
    if _dists is None:
        import importlib.metadata as md

        _dists = md.packages_distributions()
    owners = {re.sub(r"[-_.]+", "-", d).lower() for d in _dists.get(top, [])}
    if not owners or owners & _allowed:
        return False  # a local module (kiln, benchmarks, tests), or one the GPU machine has
    vendored = [p for p in sys.path if p.rstrip("/").endswith("_vendor")]
    if importlib.machinery.PathFinder.find_spec(top, vendored) is not None:
        return False  # a package's vendored copy (setuptools/_vendor/more_itertools) travels with it
    log = os.environ.get("KILN_BLOCK_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{top} ({', '.join(sorted(owners))})\n")
    return True


class _Filtered:
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, fullname, path=None, target=None):
        if _blocked(fullname):
            return None
        find = getattr(self.inner, "find_spec", None)
        return find(fullname, path, target) if find else None

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _Filtering(list):
    """Finders added later are filtered too."""

    def append(self, f):
        super().append(f if isinstance(f, _Filtered) else _Filtered(f))

    def insert(self, i, f):
        super().insert(i, f if isinstance(f, _Filtered) else _Filtered(f))


sys.meta_path = _Filtering(_Filtered(f) for f in sys.meta_path)
EOF

cat >"$WORK/summarize.py" <<'EOF'
"""summary.json from the step statuses, the logs and the result files; a short table on stdout with --print."""
import json
import re
import sys
from pathlib import Path

out, status_file, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
steps = {}
for line in status_file.read_text().splitlines():
    name, status, rc, seconds, log, note = (line.split("\t") + [""] * 6)[:6]
    steps[name] = {"status": status, "rc": int(rc), "seconds": int(seconds), "log": log, "note": note}
summary = {"suite": "benchmarks/gpu_suite.sh", "mode": mode, "steps": steps}


def read(name):
    p = out / name
    return p.read_text(errors="replace") if p.exists() else ""


def tagged(text, tag):
    found = [json.loads(m) for m in re.findall(rf"^{tag} (\{{.*\}})$", text, re.M)]
    return found[-1] if found else None


summary["machine"] = tagged(read("setup.log"), "SETUP_RESULT")
plan = re.findall(r"^\s+0\s+[\d.]+M\s+.*?([\d.]+)Gi\s+embed_tokens", read("setup.log"), re.M)
summary["memory_plan_gib"] = float(plan[-1]) if plan else None
tests = read("kernel_tests.log")
finals = re.findall(r"^=*\s*((?:\d+ \w+,? ?)+) in [\d.]+s", tests, re.M)  # pytest's last line: "3 failed, 48 passed in 9s"
counts = {k.rstrip("s") if k.startswith("error") else k: int(v)
          for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", finals[-1] if finals else "")}
summary["kernel_tests"] = {"counts": counts, "failed": re.findall(r"^FAILED (\S+)", tests, re.M)[:30],
                           "errors": re.findall(r"^ERROR (\S+)", tests, re.M)[:30],
                           "ok": bool(counts.get("passed")) and not counts.get("failed") and not counts.get("error")}
try:
    kern = json.loads(read("kernels.json") or "null")
except json.JSONDecodeError:
    kern = None
if kern:
    rows = kern.get("rows", [])
    summary["kernels"] = {
        "checks_ok": kern.get("checks_ok"),
        "checks_failed": [r["name"] for r in rows if r.get("ok") is False],
        "row_errors": [f"{r['name']} {r['shape']}: {r['note']}" for r in rows if r.get("ms") is None and "ok" not in r][:20],
        "attention": kern.get("ratios", {}).get("attention"),
        "fused": kern.get("ratios", {}).get("fused"),
    }
train_log = read("train.log")
sections = dict(re.findall(r"^=== (train_\w+) .*?\n(.*?)(?=^=== train_|\Z)", train_log, re.M | re.S))
summary["train"] = {}
for name in ("train_fused", "train_unfused"):
    text = sections.get(name, "")
    lines = re.findall(r"^step \d+/\d+ \|.*$", text, re.M)
    entry = {"console_line": lines[-1] if lines else None, "result": tagged(text, "KILN_TRAIN_RESULT")}
    if lines:
        last = lines[-1]
        for key, pat in (("tokens_per_s", r"tokens/s ([\d,]+)"), ("tflops_per_device", r"TFLOP/s/dev ([\d.]+)"),
                         ("mfu_percent", r"MFU ([\d.]+)%"), ("loss", r"loss ([\d.]+)")):
            m = re.search(pat, last)
            entry[key] = float(m.group(1).replace(",", "")) if m else None
    summary["train"][name.removeprefix("train_")] = entry
try:
    paired = json.loads(read("train.json") or "null")
except json.JSONDecodeError:
    paired = None
if paired:
    paired.pop("losses", None)
    summary["train"]["paired"] = paired
fused, unfused = summary["train"].get("fused", {}), summary["train"].get("unfused", {})
goals = {}
att = (summary.get("kernels") or {}).get("attention") or []
if att:
    goals["attention_vs_sdpa>=1.0"] = {"min": min(r["ratio"] for r in att), "all": {r["shape"]: r["ratio"] for r in att}}
fz = (summary.get("kernels") or {}).get("fused") or {}
if fz:
    goals["fused_vs_eager>=1.5"] = {k: v.get("vs_eager") for k, v in fz.items()}
    goals["fused_vs_compile"] = {k: v.get("vs_compile") for k, v in fz.items()}
if fused.get("mfu_percent") is not None:
    goals["mfu>=50%"] = {"fused": fused.get("mfu_percent"), "unfused": unfused.get("mfu_percent")}
if fused.get("tokens_per_s") and unfused.get("tokens_per_s"):
    goals["fused_on/off_tokens_per_s"] = round(fused["tokens_per_s"] / unfused["tokens_per_s"], 3)
if paired:
    goals["trainer_vs_plain>=0.95"] = {"ratio": round(paired["ratio"], 3), "paired_ratio": paired.get("paired_ratio")}
summary["goals"] = goals
(out / "summary.json.tmp").write_text(json.dumps(summary, indent=2) + "\n")
(out / "summary.json.tmp").replace(out / "summary.json")
if "--print" in sys.argv:
    print(f"{'step':<14} {'status':<8} {'s':>4}  note")
    for name, s in steps.items():
        print(f"{name:<14} {s['status']:<8} {s['seconds']:>4}  {s['note']}")
    print("kernel tests:", summary["kernel_tests"]["counts"], "failed:", summary["kernel_tests"]["failed"][:5])
    if summary.get("kernels"):
        print("kernel checks ok:", summary["kernels"]["checks_ok"], summary["kernels"]["checks_failed"][:5])
    print("memory plan GiB:", summary["memory_plan_gib"])
    print("goals:", json.dumps(goals)[:3000])
EOF

# -------------------------------------------------------------------------------------------------------------
# step runner

wanted() { [ -z "$ONLY" ] || [ "$1" = setup ] || case ",$ONLY," in *",$1,"*) true ;; *) false ;; esac; }

record() {  # name status rc seconds log note
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" >>"$STATUS"
  printf '%-14s %-8s rc=%-3s %4ss  %s\n' "$1" "$2" "$3" "$4" "$6"
  "$PY" -S "$WORK/summarize.py" "$OUT" "$STATUS" "$MODE" >/dev/null 2>>"$WORK/summarize.err" || true
}

# run_step NAME LIMIT_S LOG NOTE -- CMD...: CMD under `timeout` (SIGINT, so Python shows where it was, then
# SIGKILL 10 s later), output appended to $OUT/LOG, bounded by what is left before the deadline
run_step() {
  local name=$1 limit=$2 log=$3 note=$4
  shift 5
  wanted "$name" || return 0
  local left=$((DEADLINE - $(date +%s) - RESERVE))
  if [ "$left" -lt 20 ]; then
    record "$name" skipped 0 0 "$log" "suite budget spent"
    return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  local t0 rc status
  t0=$(date +%s)
  printf '\n=== %s (timeout %ss, %s) %s\n$ %s\n' "$name" "$limit" "$note" "$(date -u +%FT%TZ)" "$*" >>"$OUT/$log"
  timeout -s INT -k 10 "$limit" "$@" >>"$OUT/$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '=== %s: %s (rc %s) after %ss\n' "$name" "$status" "$rc" "$(($(date +%s) - t0))" >>"$OUT/$log"
  record "$name" "$status" "$rc" "$(($(date +%s) - t0))" "$log" "$note"
}

MODE=device
[ "$DRY" = 1 ] && MODE=dry-run
echo "gpu_suite.sh ($MODE): output in $OUT, budget ${BUDGET}s, python $PY"

# -------------------------------------------------------------------------------------------------------------
# setup: wheels, the kiln mapping, versions, imports, ceilings

setup_device() {
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv || true
  if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    ls -l "$REPO"/.whl/
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$REPO"/.whl/*.whl ||
      { echo "wheel install FAILED"; return 1; }
  else
    echo "no .whl/ in the checkout: carry it (run tool carry [\".whl\"]; benchmarks/gpu_wheels.sh fills it)"
    return 1
  fi
}

setup_dry() {
  if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    bash "$REPO/benchmarks/gpu_wheels.sh" --check || return 1
    # the device's install line, for CPython 3.12 manylinux x86_64, into a scratch target
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      --python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$REPO"/.whl/*.whl || return 1
    echo "installed for CPython 3.12: $(ls "$SITE" | grep -c dist-info) distributions in $SITE"
  else
    echo "no .whl/ (CI, or benchmarks/gpu_wheels.sh not run): the wheel check and install are skipped"
  fi
}

make_shim() {  # kiln/ = this checkout's kiln/*.py + pretrain/ parallel/ kernels/ recipes/ data_pipeline/, as installed
  rm -rf "$SHIM" && mkdir -p "$SHIM/kiln" || return 1
  local f
  for f in "$REPO"/kiln/*; do
    [ "$(basename "$f")" = __pycache__ ] || ln -s "$f" "$SHIM/kiln/"
  done
  for f in data_pipeline pretrain parallel kernels recipes; do ln -s "$REPO/$f" "$SHIM/kiln/$f"; done
  echo "kiln mapping: $SHIM/kiln -> $REPO (kiln/, $(echo data_pipeline pretrain parallel kernels recipes))"
}

device_dists() {  # what the GPU image has (gpu_wheels.sh's list) + what .whl/ carries + kiln itself
  sed -n '/^DEVICE_PACKAGES="[a-z]/,/"$/p' "$REPO/benchmarks/gpu_wheels.sh" | tr -d '"' | sed 's/^DEVICE_PACKAGES=//'
  ls "$REPO"/.whl/*.whl 2>/dev/null | xargs -r -n1 basename | cut -d- -f1
  echo "kilnlm megatron-core deepspeed pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson orjson"
}

if [ "$DRY" = 1 ]; then
  export KILN_DEVICE_DISTS
  KILN_DEVICE_DISTS=$(device_dists | tr '\n' ' ')
  export KILN_BLOCK_LOG=$WORK/blocked.txt
  : >"$KILN_BLOCK_LOG"
  run_step setup 240 setup.log "wheels checked + installed for cp312, kiln mapping, imports with the GPU image's packages only" -- \
    bash -c "$(declare -f setup_dry make_shim); setup_dry && make_shim && PYTHONPATH=$BLOCK:\$PYTHONPATH '$PY' '$WORK/setup_check.py' && echo \"blocked imports (absent there, tolerated): \$(sort -u '$KILN_BLOCK_LOG' | tr '\n' ' ')\""
else
  run_step setup 90 setup.log "wheels, kiln mapping, versions, imports, ceilings" -- \
    bash -c "$(declare -f setup_device make_shim); setup_device; rc=\$?; make_shim && '$PY' '$WORK/setup_check.py' && exit \$rc"
fi
SETUP_OK=1
grep -q $'^setup\tok\t' "$STATUS" || SETUP_OK=0
[ "$SETUP_OK" = 1 ] || echo "setup failed: the kernel steps still run; the training steps need the wheels (see setup.log)"

# in a dry run the trainer steps import through the blocker
TRAIN_ENV=()
[ "$DRY" = 1 ] && TRAIN_ENV=(env "PYTHONPATH=$BLOCK:$PYTHONPATH")
RECIPE=recipes/pretrain/llama_1b_1gpu.yaml
# keep in sync with DRY_OVERRIDES in benchmarks/train.py: the 1-GPU recipe shrunk to a CPU-sized model
TINY=(model.vocab_size=256 model.hidden_size=64 model.intermediate_size=128 model.num_hidden_layers=2
  model.num_attention_heads=4 model.num_key_value_heads=2 model.head_dim=16 model.max_position_embeddings=64
  synthetic_data.seq_length=64 parallel.micro_batch=2 parallel.global_batch=4)

# -------------------------------------------------------------------------------------------------------------
# memory plan of the 1B recipe on one GPU (both modes: it is computed from the recipe alone)

run_step memory_plan 60 setup.log "kiln train $RECIPE --dry-run --world-size 1; must be < 139 GiB" -- \
  bash -c "'$PY' '$WORK/kiln_train.py' train $RECIPE --dry-run --world-size 1 | tee '$WORK/plan.txt' && awk '/embed_tokens/ && \$1 == 0 { t = \$7; sub(/Gi/, \"\", t); if (t + 0 >= 139) { print \"memory plan \" t \" GiB >= 139 GiB\"; exit 1 } print \"memory plan \" t \" GiB < 139 GiB: ok\"; found = 1 } END { exit found ? 0 : 1 }' '$WORK/plan.txt'"

# -------------------------------------------------------------------------------------------------------------
# kernel tests on the device

if [ "$DRY" = 1 ]; then
  run_step kernel_tests 180 kernel_tests.log "a few tests through the same command (CPU); cuda mode refuses without a GPU" -- \
    bash -c "! KILN_KERNEL_TEST_DEVICE=cuda ${PYTEST[*]} -q -p no:cacheprovider tests/test_kernels.py -k signatures 2>&1 | grep -q 'torch.cuda.is_available() is False' && { echo 'KILN_KERNEL_TEST_DEVICE=cuda without CUDA did not refuse'; exit 1; }; KILN_KERNEL_TEST_DEVICE=cpu ${PYTEST[*]} -q -p no:cacheprovider --durations=5 tests/test_kernels.py -k 'signatures or swiglu or cu_seqlens or rope_non_contiguous or bf16_against'"
else
  XDIST=()
  "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 4)  # Triton's compiles are CPU-bound: 4 workers on 16 cores
  run_step kernel_tests 150 kernel_tests.log "KILN_KERNEL_TEST_DEVICE=cuda: compiled Triton, fp32 + bf16, fwd + bwd" -- \
    env KILN_KERNEL_TEST_DEVICE=cuda "${PYTEST[@]}" -q -p no:cacheprovider -rfEs --durations=10 "${XDIST[@]}" tests/test_kernels.py
fi

# -------------------------------------------------------------------------------------------------------------
# kernel benchmarks

if [ "$DRY" = 1 ]; then
  run_step kernels_bench 240 kernels.log "benchmarks/kernels.py --dry-run: the GPU plan at tiny shapes on CPU" -- \
    "${TRAIN_ENV[@]}" "$PY" benchmarks/kernels.py --dry-run --out-dir "$OUT" --stem kernels --no-md
else
  run_step kernels_bench 200 kernels.log "check vs float64, attention vs SDPA, fused vs eager + torch.compile" -- \
    "$PY" benchmarks/kernels.py --device cuda --out-dir "$OUT" --stem kernels --no-md
fi

# -------------------------------------------------------------------------------------------------------------
# the ~1B model through the trainer (needs the wheels)

train_step() {  # name limit note args...
  local name=$1 limit=$2 note=$3
  shift 3
  if [ "$SETUP_OK" != 1 ] && wanted "$name"; then
    record "$name" skipped 0 0 train.log "setup failed (wheels / imports): see setup.log"
    return 0
  fi
  run_step "$name" "$limit" train.log "$note" -- "$@"
}
if [ "$DRY" = 1 ]; then
  # the first DeepSpeed start on CPU JIT-builds its shared-memory op (a minute or two on 2 cores; cached after)
  train_step train_fused 400 "kiln train, tiny model, bf16, fused on" "${TRAIN_ENV[@]}" \
    "$PY" "$WORK/kiln_train.py" train $RECIPE "${TINY[@]}" train_steps=4 log_interval=2 run_dir="$WORK/run-fused"
  train_step train_paired 400 "benchmarks/train.py --gpu --dry-run: trainer vs plain loop, tiny" "${TRAIN_ENV[@]}" \
    "$PY" benchmarks/train.py --gpu --dry-run --no-record --gpu-warmup 1 --gpu-steps 2 --json-out "$OUT/train.json"
  train_step train_unfused 400 "kiln train, tiny model, bf16, fused off" "${TRAIN_ENV[@]}" \
    "$PY" "$WORK/kiln_train.py" train $RECIPE "${TINY[@]}" train_steps=4 log_interval=2 model.fused_kernels=false \
    run_dir="$WORK/run-unfused"
else
  train_step train_fused 110 "kiln train llama_1b_1gpu, fused kernels on, 20 steps" \
    "$PY" "$WORK/kiln_train.py" train $RECIPE train_steps=20 log_interval=10 run_dir="$WORK/run-fused"
  train_step train_paired 130 "benchmarks/train.py --gpu: trainer vs plain loop, 3 + 8 paired steps" \
    "$PY" benchmarks/train.py --gpu --no-record --gpu-warmup 3 --gpu-steps 8 --json-out "$OUT/train.json"
  train_step train_unfused 100 "kiln train llama_1b_1gpu model.fused_kernels=false, 20 steps" \
    "$PY" "$WORK/kiln_train.py" train $RECIPE train_steps=20 log_interval=10 model.fused_kernels=false \
    run_dir="$WORK/run-unfused"
fi

# -------------------------------------------------------------------------------------------------------------
echo "--- summary ($(($(date +%s) - START))s; files in $OUT: $(ls "$OUT" | tr '\n' ' '))"
"$PY" -S "$WORK/summarize.py" "$OUT" "$STATUS" "$MODE" --print || cat "$WORK/summarize.err" 2>/dev/null
# exit status: 0 when every step that ran is ok
! grep -qv $'\tok\t' "$STATUS"
