"""`kiln plot`: a PNG of loss / throughput curves from a synthetic metrics.jsonl."""

from __future__ import annotations

import json
import math

import pytest

from kiln.cli import main
from kiln.pretrain.plot import plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_metrics(run_dir, steps=50, with_eval=True, with_mfu=True):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            rec = {"kind": "train", "step": step, "loss": 8 * math.exp(-step / 20) + 2, "tokens_per_s": 1000 + step}
            rec["lr"] = 1e-3 * min(1, step / 10)
            if with_mfu:
                rec["mfu"] = 0.4
            f.write(json.dumps(rec) + "\n")
            if with_eval and step % 10 == 0:
                f.write(json.dumps({"kind": "eval", "step": step, "val_loss": 8 * math.exp(-step / 20) + 2.2}) + "\n")
        f.write('{"kind": "train", "step": 51, "lo')  # a line cut by a crash is ignored


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_run_writes_png_with_all_panels(tmp_path):
    run = tmp_path / "run"
    _write_metrics(run)
    out = plot_run(run)
    assert out == run / "metrics.png"
    width, height = _png_size(out)
    assert width == 800 and height == 4 * 280  # loss, tokens/s, lr, MFU panels at dpi 100
    _write_metrics(tmp_path / "lean", with_eval=False, with_mfu=False)
    small = plot_run(tmp_path / "lean", tmp_path / "x" / "lean.png")
    assert _png_size(small) == (800, 3 * 280)  # no MFU panel


def test_kiln_plot_command(tmp_path, capsys):
    run = tmp_path / "run"
    _write_metrics(run)
    assert main(["plot", str(run), "--out", str(tmp_path / "curves.png")]) == 0
    assert f"wrote {tmp_path / 'curves.png'}" in capsys.readouterr().out
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_plot_empty_metrics_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no metrics"):
        plot_run(tmp_path)
