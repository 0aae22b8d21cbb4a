"""What a GPT-2 holds and costs: parameter counts (with the tied output head counted once and
twice) and forward FLOPs."""

from dataclasses import dataclass

import torch

from gpt2_decl.core.config import GPT2Config
from gpt2_decl.core.model import GPT2


@dataclass(frozen=True)
class ParameterCounts:
    """`tied` counts each tensor once; `untied` counts per module (the head twice), as torchinfo."""

    tied: int
    untied: int
    position_embedding: int
    parts: dict[str, int]  # name -> parameters, for the first block's parts and the rest
    per_block: int

    @property
    def without_position_embedding(self) -> int:
        """N in the FLOP formula 2N + 4 n_layer T d_model."""
        return self.tied - self.position_embedding


def count_parameters(model_or_config: GPT2 | GPT2Config) -> ParameterCounts:
    """Exact counts; a config is built on the meta device, so even xl counts instantly."""
    if isinstance(model_or_config, GPT2Config):
        with torch.device("meta"):
            model = GPT2(model_or_config)
    else:
        model = model_or_config
    tied = sum(p.numel() for p in model.parameters())
    untied = sum(p.numel() for m in model.modules() for p in m.parameters(recurse=False))

    def size(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters(recurse=False))

    block = model.blocks[0]
    parts = {
        "token_embedding": size(model.token_embedding),
        "position_embedding": size(model.position_embedding),
        **{
            f"block.{name}": size(child)
            for name, child in block.named_modules()
            if name and size(child)
        },
        "ln_f": size(model.ln_f),
        "lm_head (tied to token_embedding)": size(model.lm_head),
    }
    return ParameterCounts(
        tied=tied,
        untied=untied,
        position_embedding=parts["position_embedding"],
        parts=parts,
        per_block=sum(p.numel() for p in block.parameters()),
    )


# A multiply-add is 2 FLOPs: each parameter costs one per token.
FLOPS_PER_MULTIPLY_ADD = 2
# Attention's scores and weighted sum, 2 * T * d_model FLOPs each per layer and token.
ATTENTION_FLOPS = 4
# Training: the forward pass and the backward (twice its work: gradients of inputs and weights).
TRAINING_FLOPS_PER_FORWARD = 3


def forward_flops_per_token(config: GPT2Config, seq: int) -> int:
    """2N + 4 n_layer T d_model: N counts parameters without the position embedding, the tied
    matrix once; T is the context each token attends over (counted in full, not causally)."""
    n = count_parameters(config).without_position_embedding
    return FLOPS_PER_MULTIPLY_ADD * n + ATTENTION_FLOPS * config.n_layer * seq * config.d_model


def forward_flops(config: GPT2Config, batch: int, seq: int) -> int:
    """FLOPs of one forward pass over `batch` sequences of `seq` tokens."""
    return batch * seq * forward_flops_per_token(config, seq)


def training_flops_per_token(config: GPT2Config, seq: int) -> int:
    """About 3x the forward: 6N + 12 n_layer T d_model."""
    return TRAINING_FLOPS_PER_FORWARD * forward_flops_per_token(config, seq)
