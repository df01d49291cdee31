"""The GPU suite's plan, checked on CPU (benchmarks/gpu_suite.sh, issue 11): the 1B recipe's FLOP count against a
hand count, its memory plan on one 139 GiB H200, and ``bash benchmarks/gpu_suite.sh --dry-run`` end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "pretrain" / "llama_1b_1gpu.yaml"
H200_GIB = 139  # what the device tool lends: about 139 GiB of GPU memory


def _recipe():
    from kiln.pretrain.recipe import load_recipe

    return load_recipe(str(RECIPE))


def test_1gpu_recipe_is_llama_1b_on_one_gpu():
    from kiln.catalog import list_recipes
    from kiln.pretrain.recipe import load_recipe

    r = _recipe()
    base = load_recipe(str(REPO / "recipes" / "pretrain" / "llama_1b.yaml"))
    assert r.model == base.model  # the same model as the multi-GPU recipe
    assert r.layout(1).world_size == 1 and r.precision == "bf16" and r.seq_length == 4096
    assert r.synthetic_data is not None and r.synthetic_data.documents_per_sample == 4 and r.data is None
    assert r.wandb_mode == "disabled" and r.checkpoint.interval == 0 and r.resume is False
    (entry,) = [e for e in list_recipes() if e.name == "pretrain/llama_1b_1gpu"]
    assert entry.summary.startswith("llama_1b's 1.04B-parameter model on one GPU")


def test_flops_per_token_of_the_1b_model_matches_a_hand_count():
    """Training FLOPs per token of llama_1b at seq 4096 (causal), counted here by hand from the shapes:
    hidden 2048, 16 layers, 32 query heads and 8 KV heads of 64, SwiGLU 8192, vocabulary 32768 (tied head)."""
    from kiln.pretrain.callbacks.flops import flops_per_token, peak_flops_per_device
    from kiln.pretrain.model import full_shapes

    cfg = _recipe().model
    # multiply-accumulates per token of each weight matmul, one layer:
    q_proj = 2048 * 2048  # 32 heads x 64 = 2048 outputs
    k_proj = v_proj = 2048 * 512  # 8 KV heads x 64 = 512 outputs each
    o_proj = 2048 * 2048
    mlp = 3 * 2048 * 8192  # gate, up, down
    per_layer = q_proj + k_proj + v_proj + o_proj + mlp
    assert per_layer == 60_817_408
    head = 2048 * 32768  # the LM head runs as a matmul although it is tied to the embedding
    macs = 16 * per_layer + head
    assert macs == 1_040_187_392
    matmul_flops = 2 * 3 * macs  # 2 FLOPs per MAC; backward = 2x forward (grads of inputs and of weights)
    # attention, causal: each query meets s/2 keys on average; per head QK^T (64 MACs per key) and PV (64 more)
    attention_fwd_macs_per_layer = 32 * (64 + 64) * (4096 // 2)
    attention_flops = 2 * 3 * 16 * attention_fwd_macs_per_layer
    assert attention_flops == 805_306_368
    hand = matmul_flops + attention_flops
    assert hand == 7_046_430_720
    assert flops_per_token(cfg, 4096, causal=True) == hand
    # and the non-causal convention (PaLM, Megatron count the full s x s scores) adds the other half
    assert flops_per_token(cfg, 4096) == matmul_flops + 2 * attention_flops

    # 1.04B parameters: the matmul weights above (the head is the embedding) plus 2 norms per layer and the final one
    n_params = sum(math.prod(shape) for shape in full_shapes(cfg).values())
    assert n_params == 16 * (per_layer + 2 * 2048) + 32768 * 2048 + 2048 == 1_040_254_976
    # the MFU the console line reports on an H200 (989 TFLOP/s dense bf16): 50% needs ~70k tokens/s
    peak = peak_flops_per_device("bfloat16", device_name="NVIDIA H200")
    assert peak == 989e12
    assert round(0.5 * peak / hand) == 70_177


def test_memory_plan_of_the_1b_recipe_fits_one_h200(capsys):
    from kiln.cli import main
    from kiln.pretrain.engine.memory import GIB, estimate

    r = _recipe()
    (stage,) = estimate(r, r.layout(1))
    assert stage.total_bytes / GIB < H200_GIB
    # bf16 weights 2 B, grads 2 B + 4 B fp32 accumulation, AdamW 12 B (fp32 master, m, v) per parameter at DP 1
    assert stage.weights_bytes == 2 * stage.params and stage.optimizer_bytes == 12 * stage.params
    assert main(["train", str(RECIPE), "--dry-run", "--world-size", "1"]) == 0
    out = capsys.readouterr().out
    assert "TP1 x PP1 x DP1 = 1 ranks" in out and "1040.3M parameters" in out
    (row,) = [line for line in out.splitlines() if line.split()[:1] == ["0"]]
    total = float(row.split()[6].removesuffix("Gi"))
    assert total == pytest.approx(stage.total_bytes / GIB, abs=1e-3) and total < H200_GIB


def test_kernel_benchmark_arguments_and_attention_flops():
    spec = importlib.util.spec_from_file_location("kiln_benchmark_kernels", REPO / "benchmarks" / "kernels.py")
    kb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kb)  # imported, not run: no arguments parsed, no TRITON_INTERPRET set

    args = kb._parse(["--device", "cuda", "--seqs", "2048,8192", "--dims", "64", "--stem", "kernels", "--no-md"])
    assert args.seqs == [2048, 8192] and args.dims == [64] and args.stem == "kernels" and args.no_md
    assert kb._parse(["--dry-run"]).dry_run
    assert kb.GPU_PLAN["seqs"] == [2048, 4096, 8192] and kb.GPU_PLAN["dims"] == [64, 128]
    # causal fwd+bwd: 3.5 x (4 s^2 h d / 2); 4 packed documents of s/4 do a quarter of that work
    s, h, d = 4096, 32, 64
    assert kb.attn_flops([s], 1, h, d, True) == 3.5 * 2 * s * s * h * d
    assert kb.attn_flops([s // 4] * 4, 1, h, d, True) == kb.attn_flops([s], 1, h, d, True) / 4


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_gpu_suite_dry_run(tmp_path):
    """Every step of the suite as far as a CPU takes it (~2-6 min on a 2-core machine: the interpreter, DeepSpeed
    starts, and on a fresh machine DeepSpeed's CPU shared-memory op is JIT-built once)."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1700,
    )
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:] + logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "dry-run"
    steps = summary["steps"]
    assert list(steps) == [
        "setup", "memory_plan", "kernel_tests", "kernels_bench", "train_fused", "train_paired", "train_unfused"
    ]  # fmt: skip
    assert all(s["status"] == "ok" for s in steps.values()), steps
    # what comes back from the device: at most 8 files, named in letters, digits, '.', '_' and '-', no folders
    files = sorted(p.name for p in out.iterdir())
    assert files == ["kernel_tests.log", "kernels.json", "kernels.log", "setup.log", "summary.json", "train.json",
                     "train.log"]  # fmt: skip
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    assert summary["memory_plan_gib"] < H200_GIB
    assert summary["kernel_tests"]["ok"] and summary["kernel_tests"]["counts"]["passed"] >= 5
    kern = summary["kernels"]
    assert kern["checks_ok"] is True and not kern["checks_failed"]
    assert kern["attention"] and set(kern["fused"]) == {"rms_norm+residual", "rope", "swiglu", "cross_entropy"}
    assert all(v["compile_ms"] for v in kern["fused"].values())  # the torch.compile rows ran (aot_eager here)
    for side in ("fused", "unfused"):
        entry = summary["train"][side]
        assert entry["console_line"].startswith("step 4/4 ") and entry["tokens_per_s"] > 0, entry
        assert entry["result"]["rc"] == 0
    paired = summary["train"]["paired"]
    assert paired["dry_run"] and paired["precision"] == "bf16" and paired["kiln"]["n"] == 2
    assert paired["max_loss_rel_diff"] < 1e-3  # both sides run the same bf16 update from the same weights
    assert summary["machine"]["imports"] and all(v == "ok" for v in summary["machine"]["imports"].values())
