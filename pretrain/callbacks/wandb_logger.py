"""Weights & Biases logging, offline by default, and a reader for offline run files.

Offline (the default) needs no account and no network: wandb writes the run under ``<run_dir>/wandb/
offline-run-*/run-<id>.wandb``; ``wandb sync <that dir>`` uploads it later. Online logging happens only when
the recipe says ``mode="online"``. The run id is kept in ``<run_dir>/wandb_id.txt`` so a resumed training run
continues the same W&B run.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import struct
from pathlib import Path
from typing import Any

from kiln.pretrain.callbacks.base import Callback, TrainState
from kiln.pretrain.callbacks.metrics_file import _clean

WANDB_ID_FILE = "wandb_id.txt"


def _new_run_id() -> str:
    """An 8-character W&B-style run id."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbLogger(Callback):
    """Log train metrics (``train/<name>``, at every log step) and eval metrics (``eval/<name>``) to W&B from the
    main rank.

    Args:
        run_dir: where wandb writes (``<run_dir>/wandb``); default ``state.run_dir``.
        mode: "offline" (default), "online" or "disabled".
        project, name, entity, group, tags: the usual W&B fields.
        config: the resolved recipe (a dict), stored with the run.
    """

    def __init__(
        self,
        run_dir: str | Path | None = None,
        *,
        project: str = "kiln",
        name: str | None = None,
        mode: str = "offline",
        config: dict | None = None,
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
    ):
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb mode must be offline, online or disabled; got {mode!r}")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.project, self.name, self.mode, self.config = project, name, mode, config or {}
        self.entity, self.group, self.tags = entity, group, tags
        self.run = None

    def on_train_start(self, state: TrainState) -> None:
        if not state.is_main or self.run is not None:
            return
        import wandb

        run_dir = self.run_dir or state.run_dir
        if run_dir is None:
            raise ValueError("WandbLogger needs a run_dir (argument or state.run_dir)")
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else _new_run_id()
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=self.project,
            name=self.name or run_dir.name,
            entity=self.entity,
            group=self.group,
            tags=self.tags,
            config=self.config,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            mode=self.mode,
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, x_disable_meta=True),
        )

    def _log(self, prefix: str, state: TrainState, metrics: dict[str, Any]) -> None:
        if self.run is None:  # a callback that runs before this one may log from its own on_train_start
            self.on_train_start(state)
        if self.run is None:
            return
        data = {f"{prefix}/{k}": v for k, v in _clean(metrics).items() if v is not None}
        data["tokens"] = state.tokens
        self.run.log(data, step=state.step)

    def on_log(self, state: TrainState, metrics: dict[str, Any]) -> None:
        self._log("train", state, metrics)

    def on_eval(self, state: TrainState, metrics: dict[str, Any]) -> None:
        self._log("eval", state, metrics)

    def on_train_end(self, state: TrainState) -> None:
        if self.run is not None:
            self.run.finish(exit_code=state.exit_code)
            self.run = None


# ------------------------------------------------------------------------------------------------ offline reader

_BLOCK = 32768
_RECORD_HEADER = 7  # crc32 (4) + length (2) + type (1), LevelDB log format
_FILE_HEADER = 7  # b":W&B" + magic 0xBEE1 (2) + version (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _iter_wandb_records(path: str | Path):
    """Raw protobuf records of a ``.wandb`` file (W&B's LevelDB-log-format transaction log)."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log (header {data[:4]!r})")
    pos, pending = _FILE_HEADER, b""
    while pos + _RECORD_HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _RECORD_HEADER:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _RECORD_HEADER])
        pos += _RECORD_HEADER
        chunk = data[pos : pos + length]
        pos += length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:
            continue  # zero padding
        else:
            raise ValueError(f"{path}: bad record type {kind} at byte {pos}")


def find_offline_runs(run_dir: str | Path) -> list[Path]:
    """The ``.wandb`` files of the offline runs under ``<run_dir>/wandb``, oldest first."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))


def read_wandb_history(wandb_file: str | Path) -> list[dict[str, Any]]:
    """The history rows (``run.log`` calls) of an offline ``.wandb`` file, decoded with wandb's own protobuf
    record schema (wandb 0.2x/0.3x no longer ships a Python reader for these files)."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for raw in _iter_wandb_records(wandb_file):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def offline_env(tmp_dir: str | os.PathLike) -> dict[str, str]:
    """Environment that keeps wandb off the network and out of the home directory."""
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_dir), "WANDB_SILENT": "true"}
