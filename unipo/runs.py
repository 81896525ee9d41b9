"""The run folder: config.yaml, metrics.jsonl, atomic checkpoints, and resume.

Layout of a run folder:
    config.yaml            the fully resolved TrainConfig
    metrics.jsonl          one JSON object per training step (see docs/metrics.md)
    eval.jsonl             one JSON object per evaluation
    checkpoint-<step>/     model + tokenizer (save_pretrained), optimizer.pt, trainer_state.pt
    reference/             the frozen reference model, when the recipe uses one
    latest                 the name of the newest complete checkpoint

A checkpoint is written to a temporary folder and renamed into place, and `latest` is
replaced atomically after it, so a run killed at any moment leaves a loadable checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from unipo.config import TrainConfig, dump_yaml, from_dict

CHECKPOINT_PREFIX = "checkpoint-"


class RunFolder:
    def __init__(self, path: str | os.PathLike, keep_checkpoints: int = 2) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.keep_checkpoints = keep_checkpoints

    # -- config and metrics ----------------------------------------------------------------
    def write_config(self, config: TrainConfig) -> None:
        _atomic_write_text(self.path / "config.yaml", dump_yaml(config))

    def read_config(self) -> TrainConfig:
        import yaml

        return from_dict(TrainConfig, yaml.safe_load((self.path / "config.yaml").read_text()))

    def append(self, name: str, record: dict[str, Any]) -> None:
        with open(self.path / name, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def read(self, name: str) -> list[dict[str, Any]]:
        file = self.path / name
        if not file.exists():
            return []
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]

    def truncate_after(self, name: str, step: int) -> None:
        """Drop records logged after `step` (a resumed run rewrites them)."""
        kept = [r for r in self.read(name) if r.get("step", 0) <= step]
        _atomic_write_text(self.path / name, "".join(json.dumps(r) + "\n" for r in kept))

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, step: int, model, tokenizer, state: dict[str, Any]) -> Path:
        final = self.path / f"{CHECKPOINT_PREFIX}{step}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.path))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / "trainer_state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(self.path / "latest", final.name)
        self._prune()
        return final

    def latest_checkpoint(self) -> Path | None:
        marker = self.path / "latest"
        if not marker.exists():
            return None
        path = self.path / marker.read_text().strip()
        return path if (path / "trainer_state.pt").exists() else None

    def _prune(self) -> None:
        checkpoints = sorted(self.path.glob(f"{CHECKPOINT_PREFIX}*"), key=lambda p: int(p.name.split("-")[1]))
        for old in checkpoints[: -self.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
