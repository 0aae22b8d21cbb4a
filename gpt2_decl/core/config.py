"""GPT-2 hyperparameters, with the released sizes as named presets."""

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

GPT2_VOCAB_SIZE = 50257
# The id of <|endoftext|>, the last of the vocabulary, which ends (and separates) documents.
END_OF_TEXT_ID = 50256
GPT2_CONTEXT = 1024
# The dtypes a model can be run in, by the names that options (--dtype, TrainConfig.dtype) take.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class GPT2Config:
    """Architecture of a GPT-2 model. Validated on construction."""

    vocab_size: int = GPT2_VOCAB_SIZE
    n_ctx: int = GPT2_CONTEXT
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    init_std: float = 0.02
    seed: int = 0

    PRESETS: ClassVar[dict[str, dict[str, int]]] = {
        "small": dict(n_layer=12, n_head=12, d_model=768),
        "medium": dict(n_layer=24, n_head=16, d_model=1024),
        "large": dict(n_layer=36, n_head=20, d_model=1280),
        "xl": dict(n_layer=48, n_head=25, d_model=1600),
    }
    # The MLP's hidden width is this multiple of d_model in every GPT-2.
    MLP_RATIO: ClassVar[int] = 4

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_ctx", "d_model", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"GPT2Config.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )
        for name in ("layer_norm_eps", "dropout", "init_std"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise ValueError(f"GPT2Config.{name} must be a finite number, got {value!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPT2Config.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPT2Config.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.init_std > 0:
            raise ValueError(f"GPT2Config.init_std must be > 0, got {self.init_std!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"GPT2Config.seed must be an integer, got {self.seed!r}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def d_mlp(self) -> int:
        return self.MLP_RATIO * self.d_model

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPT2Config":
        """The released GPT-2 size called `name` ("small", "medium", "large", "xl")."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def replace(self, **changes) -> "GPT2Config":
        return dataclasses.replace(self, **changes)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
