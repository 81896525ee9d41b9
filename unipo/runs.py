"""The run folder: config.yaml, metrics.jsonl, verified checkpoints, a lock, and resume.

Layout of a run folder:
    config.yaml            the fully resolved TrainConfig (its `out` is informational: the folder is the run)
    metrics.jsonl          one JSON object per training step
    eval.jsonl             one JSON object per evaluation
    checkpoint-<step>/     model + tokenizer (save_pretrained), trainer_state.safetensors (every tensor of the
                           trainer's state), trainer_state.json (the rest), manifest.json (written last)
    reference/             the frozen reference model, when the recipe uses one (with its manifest.json)
    latest                 the name of the newest checkpoint written (a hint for people; resume verifies)
    .lock                  held with flock by the process training in the folder (it holds its pid)
    tb/, wandb/            TensorBoard events and W&B files, when the config's `log` names them (unipo.tracking)

Nothing here is ever unpickled: the trainer's state is safetensors plus JSON. A checkpoint is written to a
temporary `.checkpoint-<step>.*` folder, its manifest (each file's size and sha256) last, and renamed into place;
resume takes the newest checkpoint whose manifest verifies, skipping (and naming) any that do not, so a run killed
at any moment, or a checkpoint damaged later, leaves a loadable checkpoint.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from unipo.config import TrainConfig, apply_overrides, dump_yaml, from_dict, to_dict

CHECKPOINT_PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
CHECKPOINT_FORMAT = "unipo-checkpoint-1"
LOCK = ".lock"
LOGS = ("metrics.jsonl", "eval.jsonl")
# What a run folder may hold: --overwrite empties a folder only when every entry is one of these.
_RUN_ENTRY = re.compile(r"config\.yaml|metrics\.jsonl|eval\.jsonl|latest|curves\.png|reference|checkpoint-\d+"
                        r"|tb|wandb|\.lock|\.checkpoint-.*|\.reference\..*|\..*\.tmp")
# Temporary entries an interrupted write leaves behind (removed when a run resumes, under the lock).
_STALE = re.compile(r"\.checkpoint-.*|\.reference\..*|\..*\.tmp")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked: in use, not empty, not a run, nothing to resume."""


def warn(message: str) -> None:
    """One line on stderr for something the run repaired or skipped."""
    print(f"unipo: warning: {message}", file=sys.stderr, flush=True)


class RunFolder:
    """A run's folder. Reading never creates it; writing does. `lock()` claims it for this process."""

    def __init__(self, path: str | os.PathLike, keep_checkpoints: int = 2) -> None:
        if keep_checkpoints < 1:
            raise ValueError("keep_checkpoints must be >= 1")
        self.path = Path(path)
        self.keep_checkpoints = keep_checkpoints
        self._lock_fd: int | None = None
        self._trackers = None  # unipo.tracking.Trackers, opened by write_config or the first log record
        self._tracking_open = False
        self._resumed_at: int | None = None

    def _ensure_dir(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.path} is a file, not a run folder")
        self.path.mkdir(parents=True, exist_ok=True)

    # -- the lock --------------------------------------------------------------------------
    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def lock(self) -> None:
        """Hold `.lock` (flock, exclusive) until `unlock()` or this process ends; refuse if another holds it."""
        if self._lock_fd is not None:
            return
        self._ensure_dir()
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_pid(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            who = f" (pid {holder})" if holder else ""
            raise RunFolderError(f"{self.path} is in use by another run{who}: wait for it to end, "
                                 f"or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    def in_use(self) -> bool:
        """Whether a process holds the folder's lock (a run is training in it); never takes it."""
        if self._lock_fd is not None:
            return True
        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)  # releases the shared lock if it was taken

    def __del__(self) -> None:
        try:
            self.unlock()
            self.close_trackers()
        except Exception:  # interpreter shutdown
            pass

    def claim_new(self, *, overwrite: bool = False) -> bool:
        """Lock the folder for a new run. A folder that holds anything (besides `.lock`) is refused, or with
        `overwrite` emptied first (only when everything in it belongs to a run folder). Returns whether the
        folder had to be created."""
        created = not self.path.exists()
        self.lock()
        try:
            entries = sorted(p.name for p in self.path.iterdir() if p.name != LOCK)
            if entries:
                foreign = [name for name in entries if not _RUN_ENTRY.fullmatch(name)]
                listing = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
                if foreign:
                    raise RunFolderError(f"{self.path} is not empty and is not a unipo run folder "
                                         f"({foreign[0]!r} is not a run's file): choose another --out")
                if not overwrite:
                    raise RunFolderError(f"{self.path} already holds a run ({listing}): continue it with --resume, "
                                         f"start over with --overwrite (deletes it), or choose another --out")
                for name in entries:
                    _remove(self.path / name)
        except BaseException:
            self.unlock()
            raise
        return created

    def release_new(self, created: bool) -> None:
        """Undo `claim_new` for a run that failed before writing anything: unlock, and remove a folder it made."""
        self.unlock()
        if created and [p.name for p in self.path.iterdir()] == [LOCK]:
            (self.path / LOCK).unlink(missing_ok=True)
            self.path.rmdir()

    # -- config and metrics ----------------------------------------------------------------
    def is_run(self) -> bool:
        return (self.path / "config.yaml").is_file()

    def write_config(self, config: TrainConfig) -> None:
        self._ensure_dir()
        _atomic_write_text(self.path / "config.yaml", dump_yaml(config))
        if not (self.path / "metrics.jsonl").exists():  # a new run: a tracker that cannot start fails it now
            self._open_trackers(config)  # (a resumed one opens them at its first record, after truncate_after)

    # -- trackers: metrics.jsonl and eval.jsonl records are mirrored to those the config's `log` names -----
    def _open_trackers(self, config: TrainConfig | None) -> None:
        if self._tracking_open:
            return
        self._tracking_open = True
        if config is not None and set(config.log) - {"jsonl"}:
            from unipo.tracking import Trackers

            self._trackers = Trackers(self.path, config.log, to_dict(config), resume_step=self._resumed_at)

    def close_trackers(self) -> None:
        """Flush and close the trackers (W&B marks its run finished); a later record opens them again."""
        trackers, self._trackers, self._tracking_open = self._trackers, None, False
        if trackers is not None:
            trackers.close()

    def read_config(self) -> TrainConfig:
        import yaml

        file = self.path / "config.yaml"
        if not file.is_file():
            raise RunFolderError(f"{self.path} is not a run folder (no config.yaml)")
        try:
            return from_dict(TrainConfig, yaml.safe_load(file.read_text()))
        except (yaml.YAMLError, TypeError, ValueError) as err:
            raise RunFolderError(f"{file}: {err}") from None

    def append(self, name: str, record: dict[str, Any]) -> None:
        """Append `record` as one line of strict JSON: NaN and inf (which JSON has no word for; Python would write
        bare `NaN`) are written as null, and the record lists their keys under "nonfinite"."""
        import math

        nonfinite: list[str] = []

        def clean(value: Any, key: str) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                nonfinite.append(key)
                return None
            if isinstance(value, dict):
                return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [clean(v, key) for v in value]
            return value

        record = clean(record, "")
        if nonfinite:
            record["nonfinite"] = list(dict.fromkeys(nonfinite))
        self._ensure_dir()
        with open(self.path / name, "a") as fh:
            fh.write(json.dumps(record, allow_nan=False) + "\n")
        if name in LOGS:
            self._open_trackers(self.read_config() if self.is_run() else None)
            if self._trackers is not None:
                self._trackers.log(name, record)

    def read(self, name: str) -> list[dict[str, Any]]:
        """The records of a jsonl log. A last line without its newline is a write in progress (or cut short by a
        kill) and is left out; any other line that is not JSON is an error naming the file and line."""
        file = self.path / name
        if not file.exists():
            return []
        text = file.read_text()
        lines = text.split("\n")
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                if number == len(lines):  # no newline after it: unfinished
                    continue
                raise RunFolderError(f"{file}:{number} is not a JSON record ({err.msg})") from None
        return records

    def repair_log(self, name: str) -> bool:
        """Cut a partial last line (no newline: the write was interrupted) off a jsonl log; True when it did."""
        file = self.path / name
        if not file.exists():
            return False
        data = file.read_bytes()
        if not data or data.endswith(b"\n"):
            return False
        keep = data[: data.rfind(b"\n") + 1]
        _atomic_write_bytes(file, keep)
        warn(f"{file}: removed a partial last line ({len(data) - len(keep)} bytes) left by an interrupted write")
        return True

    def truncate_after(self, name: str, step: int) -> None:
        """Drop records logged after `step` (a resumed run rewrites them)."""
        self._resumed_at = step  # TensorBoard drops its events after `step` too (tracking.Trackers)
        if not (self.path / name).exists():
            return
        kept = [r for r in self.read(name) if r.get("step", 0) <= step]
        _atomic_write_text(self.path / name, "".join(json.dumps(r) + "\n" for r in kept))

    def remove_stale(self) -> list[str]:
        """Remove the temporary files and folders an interrupted write left (call it holding the lock)."""
        if not self.path.is_dir():
            return []
        stale = sorted(p.name for p in self.path.iterdir() if _STALE.fullmatch(p.name))
        for name in stale:
            _remove(self.path / name)
        if stale:
            listing = ", ".join(stale[:3]) + (", ..." if len(stale) > 3 else "")
            warn(f"{self.path}: removed {len(stale)} stale temporary entr{'y' if len(stale) == 1 else 'ies'} "
                 f"left by an interrupted write ({listing})")
        return stale

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, step: int, model, tokenizer, state: dict[str, Any],
                        weights: dict[str, Any] | None = None) -> Path:
        """Write checkpoint-<step> (replacing one of that step), point `latest` at it, prune older ones.
        `weights`: the model's full state dict when `model` holds only a shard of it (FSDP)."""
        self._ensure_dir()
        final = self.path / f"{CHECKPOINT_PREFIX}{step}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.path))
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": weights} if weights else {}),
                              **_adapter_options(model))
        tokenizer.save_pretrained(tmp)
        save_trainer_state(tmp, state)
        write_manifest(tmp, step)
        _install(tmp, final)
        _atomic_write_text(self.path / "latest", final.name)
        self._prune(step)
        return final

    def save_reference(self, model, tokenizer) -> None:
        """The frozen reference model, once per run, atomically and with a manifest."""
        final = self.path / "reference"
        if final.exists():
            return
        self._ensure_dir()
        tmp = Path(tempfile.mkdtemp(prefix=".reference.", dir=self.path))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, None)
        _install(tmp, final)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, folder) of every checkpoint-<step> folder, oldest first (verified or not)."""
        if not self.path.is_dir():
            return []
        found = []
        for path in self.path.iterdir():
            match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest_checkpoint(self, skipped: list[str] | None = None) -> Path | None:
        """The newest checkpoint whose manifest verifies; each newer one that does not is named in `skipped`."""
        for step, path in reversed(self.checkpoints()):
            problem = verify(path, step)
            if problem is None:
                return path
            if skipped is not None:
                skipped.append(f"skipped {path.name}: {problem}")
        return None

    def _prune(self, current: int) -> None:
        """Keep the newest `keep_checkpoints` up to `current` (the one just written always among them); a
        checkpoint past `current` belongs to a discarded future (its log lines were truncated) and goes too."""
        steps = self.checkpoints()
        doomed = [path for step, path in steps if step > current]
        kept = [path for step, path in steps if step <= current]
        doomed += kept[: -self.keep_checkpoints]
        for path in doomed:
            _remove(path)


def _adapter_options(model) -> dict[str, Any]:
    """A LoRA model saves its adapter only: unipo never resizes the vocabulary, and peft's check whether it did
    looks the base model up on the hub when the base is not a folder (the embedded "tiny")."""
    return {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}


# -- the trainer's state: safetensors for tensors, JSON for everything else -------------------------------
def save_trainer_state(folder: Path, state: Mapping[str, Any]) -> None:
    """`state` (nested dicts, lists, tuples, numbers, strings, None, tensors) as STATE_JSON + STATE_TENSORS."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, "state")
    save_file(tensors, str(folder / STATE_TENSORS), metadata={"format": CHECKPOINT_FORMAT})
    (folder / STATE_JSON).write_text(json.dumps({"format": CHECKPOINT_FORMAT, "state": encoded}))


def load_trainer_state(folder: Path) -> dict[str, Any]:
    """The state `save_trainer_state` wrote: JSON and safetensors only (never a pickle)."""
    from safetensors.torch import load_file

    document = json.loads((Path(folder) / STATE_JSON).read_text())
    if document.get("format") != CHECKPOINT_FORMAT:
        raise RunFolderError(f"{folder / STATE_JSON}: format {document.get('format')!r}, "
                             f"expected {CHECKPOINT_FORMAT!r}")
    return _decode(document["state"], load_file(str(Path(folder) / STATE_TENSORS), device="cpu"))


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    # A JSON object is either a plain dict (str keys, none named "$t") or a tagged value {"$t": kind, ...}.
    if isinstance(value, torch.Tensor):
        key = path if path not in tensors else f"{path}#{len(tensors)}"
        tensors[key] = value.detach().to("cpu").contiguous()
        return {"$t": "tensor", "key": key}
    if isinstance(value, tuple):
        return {"$t": "tuple", "items": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value) and "$t" not in value:
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in value.items()}
        return {"$t": "dict", "items": [[_encode(k, tensors, f"{path}.key"), _encode(v, tensors, f"{path}.{k}")]
                                        for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"trainer state {path}: a {type(value).__name__} cannot be saved as JSON or safetensors")


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    kind = value.get("$t")
    if kind is None:
        return {k: _decode(v, tensors) for k, v in value.items()}
    if kind == "tensor":
        return tensors[value["key"]]
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in value["items"])
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["items"]}
    raise ValueError(f"unknown tagged value {kind!r} in the trainer state")


# -- manifests ------------------------------------------------------------------------------------------
def write_manifest(folder: Path, step: int | None) -> None:
    """Each file's size and sha256 (synced to disk on the way), written last: a folder whose manifest verifies
    was written completely."""
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[file.relative_to(folder).as_posix()] = {"bytes": file.stat().st_size, "sha256": _sha256(file, sync=True)}
    manifest = {"format": CHECKPOINT_FORMAT, "step": step, "files": files}
    _atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n", sync=True)


def verify(folder: Path, step: int | None = None) -> str | None:
    """None when `folder`'s manifest verifies (every file listed, with its size and sha256); else why not."""
    file = folder / MANIFEST
    if not file.is_file():
        old = " (a checkpoint of an older unipo: its pickled trainer_state.pt is never loaded)" \
            if (folder / "trainer_state.pt").exists() else " (its write did not finish)"
        return f"no {MANIFEST}{old}"
    try:
        manifest = json.loads(file.read_text())
        files = manifest["files"]
        if manifest.get("format") != CHECKPOINT_FORMAT:
            return f"{MANIFEST} has format {manifest.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"
        entries = [(name, int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__}: {err})"
    if step is not None:
        if manifest.get("step") != step:
            return f"{MANIFEST} is for step {manifest.get('step')!r}, not {step}"
        missing = [name for name in (STATE_JSON, STATE_TENSORS) if name not in files]
        if missing:
            return f"{MANIFEST} does not list {missing[0]}"
    listed = {name for name, _, _ in entries} | {MANIFEST}
    extra = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.relative_to(folder).as_posix() not in listed)
    if extra:
        return f"it holds {extra[0]}, which its {MANIFEST} does not list (a checkpoint loads only what it wrote)"
    for name, size, digest in entries:
        path = folder / name
        if ".." in Path(name).parts or not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, its manifest says {size}"
        if _sha256(path) != digest:
            return f"{name} does not match its sha256 in {MANIFEST}"
    return None


def _sha256(path: Path, *, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(fh.fileno())
    return digest.hexdigest()


# -- settings of a resumed run -----------------------------------------------------------------------------
def settings_differences(config: TrainConfig, given: Mapping[str, Any], overrides: Mapping[str, str]) -> list[str]:
    """What a resume was asked that differs from the run's saved config: `given` options (recipe by name, task,
    model, seed) and `key=value` overrides (checked as for a new run: an unknown key raises). `steps` may differ;
    `config.out` should already be the folder being resumed."""
    differences = []
    for option, value in given.items():
        saved = config.recipe.name if option == "recipe" else getattr(config, option)
        if value != saved:
            differences.append(f"--{option}: saved {saved!r}, given {value!r}")
    for key, raw in overrides.items():
        changed = apply_overrides(config, {key: raw})
        if key == "steps":
            continue
        saved, requested = _lookup(config, key), _lookup(changed, key)
        if saved != requested:
            differences.append(f"{key}: saved {saved!r}, given {requested!r}")
    return differences


def _lookup(config: Any, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else getattr(value, part, None)
    return to_dict(value)


# -- files -----------------------------------------------------------------------------------------------
def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _remove(path: Path) -> None:
    """Remove a file or folder; a folder is first renamed aside, so it disappears at once rather than half."""
    if path.is_dir() and not path.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name.lstrip('.')}.deleted-", dir=path.parent))
        os.replace(path, aside / path.name)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished temporary folder into place (an existing folder of that name goes first)."""
    if final.exists():
        _remove(final)
    os.replace(tmp, final)
    _sync_dir(final.parent)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str, *, sync: bool = False) -> None:
    _atomic_write_bytes(path, text.encode(), sync=sync)


def _atomic_write_bytes(path: Path, data: bytes, *, sync: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if sync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
