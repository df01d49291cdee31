"""The Triton kernels compile for an H100 (sm_90, bf16 configs the CUDA host code launches) without a GPU.

Runs ``python -m kiln.kernels.compile_check`` in a subprocess with TRITON_INTERPRET unset (test_kernels.py sets it for
this process, and the interpreter replaces the jit functions). Triton lowers each kernel to PTX and assembles it
with the ptxas bundled in the triton wheel; the check also fails when a kernel needs more shared memory than an
sm_90 block has. Numerical correctness is covered by tests/test_kernels.py under the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    triton = pytest.importorskip("triton")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"ptxas not bundled with this triton: {ptxas}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "kiln.kernels.compile_check", "--arch", "90", "--dtype", "bf16"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ok ")]
    # 3 attention kernels x 2 head dims + rms fwd/bwd + rope fwd/bwd + swiglu fwd/bwd + ce fwd/bwd
    assert len(lines) == 14, proc.stdout
