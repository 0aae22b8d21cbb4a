"""The options of a training run, checked when they are made: nothing is written before."""

from dataclasses import dataclass

import torch

from gpt2_decl.core.config import DTYPES, GPT2Config
from gpt2_decl.core.devices import resolve_device

DEFAULT_PRESET = "small"
ARCHITECTURE_OPTIONS = (
    "preset", "n_layer", "n_head", "d_model", "n_ctx", "vocab_size", "init_from"
)
PATH_OPTIONS = ("init_from", "cache_dir")
# With no --min-lr the cosine ends at a tenth of the peak learning rate, as in GPT-3.
MIN_LR_RATIO = 0.1


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run (the `gpt2-decl train` flags, with underscores)."""

    data: str
    out: str
    preset: str | None = None  # "small" unless an architecture comes from init_from
    n_layer: int | None = None
    n_head: int | None = None
    d_model: int | None = None
    n_ctx: int | None = None
    vocab_size: int | None = None
    init_from: str | None = None
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 6e-4
    min_lr: float | None = None
    warmup_steps: int = 100
    weight_decay: float = 0.1
    clip_grad: float | None = 1.0
    dtype: str = "float32"
    compile: bool = False
    eval_every: int = 100
    eval_batches: int = 20
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    val_fraction: float = 0.1
    seed: int = 0
    resume: bool = False
    device: str | None = None
    cache_dir: str | None = None
    typecheck: bool = False
    progress: bool = True
    measure_mfu: bool = True

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum", "steps", "eval_every", "eval_batches",
                    "checkpoint_every", "keep_checkpoints")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"clip_grad must be > 0 (None: no clipping), got {self.clip_grad!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.preset is not None and self.preset not in GPT2Config.PRESETS:
            presets = sorted(GPT2Config.PRESETS)
            raise ValueError(f"unknown preset {self.preset!r}; expected one of {presets}")
        if self.init_from is not None:
            given = [name for name in ARCHITECTURE_OPTIONS[:-1] if getattr(self, name) is not None]
            if given:
                raise ValueError(
                    f"init_from takes the architecture from {self.init_from}; "
                    f"drop {', '.join(given)}"
                )
        else:
            self.model_config()  # a bad architecture fails here, before any work
        if not (isinstance(self.val_fraction, float) and 0.0 < self.val_fraction < 1.0):
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        resolve_device(self.device)

    @property
    def final_lr(self) -> float:
        return self.lr * MIN_LR_RATIO if self.min_lr is None else self.min_lr

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def model_config(self) -> GPT2Config:
        """The architecture to build from scratch (not used with init_from)."""
        overrides = {
            name: getattr(self, name)
            for name in ("n_layer", "n_head", "d_model", "n_ctx", "vocab_size")
            if getattr(self, name) is not None
        }
        return GPT2Config.from_preset(self.preset or DEFAULT_PRESET, seed=self.seed, **overrides)
