"""Training checkpoints on disk: writing them atomically, finding the latest, reading them back.

    OUT/checkpoints/step-0000500/   config.json + model.safetensors   (save_pretrained: loads in
                                    from_pretrained, `gpt2-decl generate`, transformers)
                                    training_state.pt   (optimizer, step, data position, RNG states,
                                                         loss history; loads with weights_only=True)
                                    training_options.json   (the TrainConfig)
    OUT/latest -> checkpoints/step-0000500   (a symlink, replaced atomically)

A checkpoint is written under a temporary name and renamed when complete; `latest` moves only
then, so a crash mid-write never touches the last good checkpoint.
"""

import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from gpt2_decl.atomic import atomic_write
from gpt2_decl.model import GPT2
from gpt2_decl.weights import CONFIG_FILE

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
LATEST = "latest"
STATE_FILE = "training_state.pt"
OPTIONS_FILE = "training_options.json"
PARTIAL_SUFFIX = ".partial"


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The checkpoint directory OUT/latest points to, or None."""
    marker = Path(out) / LATEST
    return marker.resolve() if marker.is_symlink() and marker.exists() else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A weights directory itself, or a training --out directory (its latest checkpoint)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(
            f"{path} is neither a checkpoint directory (no {CONFIG_FILE}) nor a training --out "
            f"directory (no {LATEST} checkpoint)"
        )
    return latest


def read_training_options(checkpoint: Path) -> dict | None:
    file = checkpoint / OPTIONS_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{step:07d}"


def save_checkpoint(out: Path, model: GPT2, state: dict, options: dict, keep: int) -> None:
    """Write the checkpoint of `state["step"]` (the weights, `state`, the training `options`),
    point OUT/latest at it, and keep the newest `keep` checkpoints."""
    final = checkpoint_dir(out, state["step"])
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".{final.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"
    model.save_pretrained(partial)
    with atomic_write(partial / STATE_FILE) as tmp:
        torch.save(state, tmp)
    with atomic_write(partial / OPTIONS_FILE) as tmp:
        tmp.write_text(json.dumps(options, indent=1) + "\n")
    if final.exists():  # left by a run that crashed before moving `latest` onto it
        final.rename(root / f".{final.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
    partial.rename(final)
    link = out / f".{LATEST}.{uuid.uuid4().hex}.tmp"
    link.symlink_to(final.relative_to(out))
    os.replace(link, out / LATEST)
    _remove_old_checkpoints(root, keep, current=final)


def _remove_old_checkpoints(root: Path, keep: int, current: Path) -> None:
    """Keep the newest `keep` checkpoints, and `current` always; drop partial ones that a crash
    left behind."""
    for leftover in root.glob(f".*{PARTIAL_SUFFIX}"):
        shutil.rmtree(leftover, ignore_errors=True)
    finished = sorted(root.glob(f"{CHECKPOINT_PREFIX}*"))
    for old in finished[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def load_state(checkpoint: Path) -> dict:
    """The training state saved beside a checkpoint's weights (tensors land on the CPU)."""
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
