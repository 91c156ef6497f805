"""Run checkpoints: weights in safetensors, training state beside them, every write atomic.

A checkpoint named ``{model}-{epoch}_{step}`` is two files: ``.safetensors`` (the network, readable by
everything in this package) and ``.state.pt`` (optimizer, EMA, scaler, RNG states, counters; tensors
and plain containers only, so it loads with ``weights_only=True``).  The state is written first and the
weights last, so a checkpoint counts as complete when both exist; a crash in between leaves the
previous checkpoints as they were.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError
from .fileio import atomic_path, torch_bytes
from .weights import save_weights

STATE_SUFFIX = ".state.pt"
WEIGHTS_SUFFIX = ".safetensors"
EMA_SUFFIX = "_ema.safetensors"  # the EMA copy the trainer writes beside a checkpoint when ema is on
_NAME = re.compile(r"^(?P<model>.+)-(?P<epoch>\d+)_(?P<step>\d+)$")


@dataclass(frozen=True)
class CheckpointRef:
    stem: Path  # directory / "{model}-{epoch}_{step}"
    epoch: int
    step: int

    @property
    def weights(self) -> Path:
        return self.stem.with_name(self.stem.name + WEIGHTS_SUFFIX)

    @property
    def state(self) -> Path:
        return self.stem.with_name(self.stem.name + STATE_SUFFIX)

    @property
    def ema(self) -> Path:
        return self.stem.with_name(self.stem.name + EMA_SUFFIX)


def rng_state() -> dict[str, Any]:
    """Every random generator the loop draws from, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": (int(np_state[3]), float(np_state[4])),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], *state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def best_weights_path(directory: str | Path, model_name: str) -> Path:
    """Where a run keeps the weights of its best evaluation so far."""
    return Path(directory) / f"{model_name}_best{WEIGHTS_SUFFIX}"


def checkpoint_ref(directory: Path, model_name: str, epoch: int, step: int) -> CheckpointRef:
    return CheckpointRef(Path(directory) / f"{model_name}-{epoch}_{step}", epoch, step)


def save_checkpoint(
    ref: CheckpointRef,
    model: nn.Module,
    state: dict[str, Any],
    source: str = "",
    classes: Sequence[str] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> None:
    """State first, weights last: the weights file is the mark of a complete checkpoint."""
    with atomic_path(ref.state) as tmp:
        tmp.write_bytes(torch_bytes(state))
    save_weights(ref.weights, model, fmt="safetensors", source=source, classes=classes, evaluation=evaluation)


def remove_checkpoint(ref: CheckpointRef) -> None:
    for path in (ref.weights, ref.ema, ref.state):  # weights first: never a complete-looking half
        path.unlink(missing_ok=True)


def list_checkpoints(directory: Path, model_name: str | None = None) -> list[CheckpointRef]:
    """Complete checkpoints (both files present) in ``directory``, oldest first."""
    refs = []
    for weights in Path(directory).glob(f"*{WEIGHTS_SUFFIX}"):
        match = _NAME.match(weights.name[: -len(WEIGHTS_SUFFIX)])
        if not match or (model_name and match["model"] != model_name):
            continue
        ref = CheckpointRef(
            weights.with_name(weights.name[: -len(WEIGHTS_SUFFIX)]), int(match["epoch"]), int(match["step"])
        )
        if ref.state.exists():
            refs.append(ref)
    return sorted(refs, key=lambda r: (r.epoch, r.step))


def load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(
            f"training state {path} not found: --resume_opt needs the .state.pt file written beside the weights"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"training state {path} is unreadable ({exc}); it may be truncated or corrupt") from None
    if not isinstance(state, dict) or "epoch" not in state:
        raise CheckpointError(f"{path} is not a training state written by shufflenetv2 train")
    return state


def resolve_resume(ckpt_path: str) -> CheckpointRef:
    """The checkpoint whose weights or state file ``ckpt_path`` names."""
    path = Path(ckpt_path)
    name = path.name
    for suffix in (STATE_SUFFIX, WEIGHTS_SUFFIX):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    match = _NAME.match(name)
    epoch, step = (int(match["epoch"]), int(match["step"])) if match else (0, 0)
    return CheckpointRef(path.with_name(name), epoch, step)


def _score(value: Any) -> float | None:
    """A score from the caller or the index; None (or nan) means "not validated" and ranks last."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


class CheckpointKeeper:
    """MindCV's ``ckpt_save_policy``: keep the newest (latest_k) or the best (top_k) checkpoints.

    The checkpoint just added is never deleted, whatever its rank: it is where ``auto_resume`` picks
    up.  Under top_k it is kept beside the best ``keep`` (one file more than MindCV) until a newer
    one replaces it.  ``none`` deletes nothing, as MindCV's policy None does.

    Interim checkpoints (written inside an epoch: ``ckpt_save_steps`` or a stop signal) stand outside
    the policy: only the newest is kept, and the next epoch-end checkpoint removes it.
    """

    def __init__(self, directory: Path, model_name: str, policy: str, keep: int) -> None:
        self.directory, self.model_name, self.policy, self.keep = Path(directory), model_name, policy, keep
        self.index_path = self.directory / "checkpoints.json"
        self.scores: dict[str, float | None] = {}
        self.interim: list[str] = []
        if self.index_path.exists():
            try:
                index = json.loads(self.index_path.read_text())
                if "scores" not in index:  # the first index format: only the scores
                    index = {"scores": index}
                self.scores = {str(k): _score(v) for k, v in index["scores"].items()}
                self.interim = [str(name) for name in index.get("interim", [])]
            except (ValueError, TypeError, AttributeError):  # unreadable index: rank what is on disk as unscored
                self.scores, self.interim = {}, []

    def _rank(self, ref: CheckpointRef) -> tuple:
        if self.policy == "top_k":  # best first; on a tie the earlier checkpoint stays first, as in MindCV
            score = self.scores.get(ref.stem.name)
            return (math.inf if score is None else -score, ref.epoch, ref.step)
        return (-ref.epoch, -ref.step)  # latest_k: newest first

    def add(self, ref: CheckpointRef, score: float | None, interim: bool = False) -> list[CheckpointRef]:
        """Record a new checkpoint; delete and return the ones the policy no longer keeps."""
        existing = list_checkpoints(self.directory, self.model_name)
        name = ref.stem.name
        old_interim = [r for r in existing if r.stem.name in self.interim and r.stem != ref.stem]
        if interim:
            dropped = old_interim
            self.interim = [name]
        else:
            self.scores[name] = _score(score)
            regular = [r for r in existing if r.stem.name not in self.interim or r.stem == ref.stem]
            ranked = [] if self.policy == "none" else sorted(regular, key=self._rank)
            dropped = [r for r in ranked[self.keep :] if r.stem != ref.stem] + old_interim
            self.interim = []
        for old in dropped:
            remove_checkpoint(old)
            self.scores.pop(old.stem.name, None)
        with atomic_path(self.index_path) as tmp:
            tmp.write_text(json.dumps({"scores": self.scores, "interim": self.interim}, indent=1))
        return dropped


def remove_partial_files(directory: Path, model_name: str) -> list[Path]:
    """Delete what an interrupted save left behind: temporary files, and checkpoint parts without weights.

    Safe only while no other process writes to ``directory`` (the trainer calls it once, on rank 0,
    before training starts).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = [p for p in directory.glob(".*.tmp") if p.is_file()]
    complete = {ref.stem.name for ref in list_checkpoints(directory, model_name)}
    for suffix in (STATE_SUFFIX, EMA_SUFFIX):
        for part in directory.glob(f"{model_name}-*{suffix}"):
            stem = part.name[: -len(suffix)]
            if _NAME.match(stem) and stem not in complete and not (directory / (stem + WEIGHTS_SUFFIX)).exists():
                removed.append(part)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
