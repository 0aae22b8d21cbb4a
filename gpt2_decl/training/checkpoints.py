"""Training checkpoints on disk: writing them atomically, and finding one to resume from.

    OUT/checkpoints/step-0000500/   config.json + model.safetensors   (save_pretrained: loads in
                                    from_pretrained, `gpt2-decl generate`, transformers)
                                    training_state.pt   (optimizer, step, data position, RNG states,
                                                         loss history; loads with weights_only=True)
                                    training_options.json   (the TrainConfig)
    OUT/latest -> checkpoints/step-0000500   (a symlink, replaced atomically)

A checkpoint is written under a temporary name and renamed when complete; `latest` moves only
then, so a crash mid-write never touches the last good checkpoint. Resuming takes the newest
checkpoint that loads whole, and says so when that is not the one `latest` names.
"""

import json
import os
import pickle
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2_decl.core.model import GPT2
from gpt2_decl.storage.atomic import atomic_write
from gpt2_decl.storage.huggingface import LATEST, CheckpointError

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
STATE_FILE = "training_state.pt"
OPTIONS_FILE = "training_options.json"
PARTIAL_SUFFIX = ".partial"
DAMAGED_PREFIX = "damaged-"


class NoCheckpointError(FileNotFoundError):
    """A run directory holds no checkpoint that can be resumed."""


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{step:07d}"


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The checkpoint directory OUT/latest names (which may since have been deleted), or None."""
    marker = Path(out) / LATEST
    return marker.resolve() if marker.is_symlink() else None


def read_training_options(checkpoint: Path) -> dict | None:
    file = checkpoint / OPTIONS_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def save_checkpoint(out: Path, model: GPT2, state: dict, options: dict, keep: int) -> Path:
    """Write the checkpoint of `state["step"]` (the weights, `state`, the training `options`),
    point OUT/latest at it, keep the newest `keep` checkpoints, and return its directory."""
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
    return final


def _remove_old_checkpoints(root: Path, keep: int, current: Path) -> None:
    """Keep the newest `keep` checkpoints, and `current` always; drop partial ones that a crash
    left behind."""
    # A partial checkpoint, or what an interrupted save into one left beside it.
    for leftover in root.glob(f".*{PARTIAL_SUFFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    finished = sorted(root.glob(f"{CHECKPOINT_PREFIX}*"))
    for old in finished[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


@dataclass
class Resumable:
    """A checkpoint that loaded whole: its directory, weights and training state."""

    directory: Path
    model: GPT2
    state: dict


def load_resumable(out: Path, device: torch.device, warn: Callable[[str], None]) -> Resumable:
    """The newest checkpoint of the run in `out` that loads whole: the one `latest` names, or,
    if that one is damaged or gone, the newest intact one before it (with a warning naming the
    damage). Raises NoCheckpointError listing what was found when none loads."""
    named = latest_checkpoint(out)
    steps = sorted((out / CHECKPOINTS_DIR).glob(f"{CHECKPOINT_PREFIX}*"), reverse=True)
    candidates = ([named] if named is not None else []) + [s for s in steps if s != named]
    problems = []
    damaged = []
    for directory in candidates:
        try:
            resumable = Resumable(directory, _load_model(directory, device), load_state(directory))
        except torch.OutOfMemoryError:
            raise  # the machine's trouble, not the checkpoint's
        except (OSError, CheckpointError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
            problems.append(f"{directory.name}: {_first_line(error)}")
            damaged.append(directory)
            continue
        # Set aside, not deleted, so that they neither hold a place among the checkpoints kept
        # nor are taken for the newest again.
        for bad in (path for path in damaged if path.is_dir()):
            bad.rename(bad.with_name(f"{DAMAGED_PREFIX}{bad.name}"))
        if problems:
            warn(f"warning: skipped damaged checkpoints ({'; '.join(problems)}; renamed "
                 f"{DAMAGED_PREFIX}...); resuming from {directory}")
        return resumable
    if not candidates:
        raise NoCheckpointError(f"resume: {out} holds no checkpoint ({LATEST} is missing)")
    raise NoCheckpointError(
        f"resume: no checkpoint in {out} loads whole: {'; '.join(problems)}"
    )


def _load_model(directory: Path, device: torch.device) -> GPT2:
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist")
    return GPT2.from_pretrained(directory, dtype=torch.float32, device=device)


def load_state(checkpoint: Path) -> dict:
    """The training state saved beside a checkpoint's weights (tensors land on the CPU)."""
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
