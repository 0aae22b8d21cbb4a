"""Parameter counts that handle the tied output head, and a printable breakdown."""

from dataclasses import dataclass

import torch

from gpt2_decl.config import GPT2Config
from gpt2_decl.model import GPT2


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
        **{f"block.{name}": size(child) for name, child in block.named_children()},
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


def format_summary(config: GPT2Config, title: str = "") -> str:
    counts = count_parameters(config)
    head = counts.parts["lm_head (tied to token_embedding)"]
    lines = [
        title or "GPT-2",
        f"  n_layer={config.n_layer} n_head={config.n_head} d_model={config.d_model} "
        f"d_head={config.d_head} n_ctx={config.n_ctx} vocab={config.vocab_size}",
        "",
        f"  {'part':<36}{'parameters':>15}",
    ]
    for name, count in counts.parts.items():
        if name.startswith("block."):
            name = f"  {name} (x{config.n_layer})"
        lines.append(f"  {name:<36}{count:>15,}")
    lines += [
        f"  {'each block':<36}{counts.per_block:>15,}",
        f"  {f'all {config.n_layer} blocks':<36}{counts.per_block * config.n_layer:>15,}",
        "",
        f"  {'total, tied (unique tensors)':<36}{counts.tied:>15,}",
        f"  {'total, counted untied':<36}{counts.untied:>15,}",
        "",
        f"  The output head reuses the token embedding ({head:,} parameters), so the model holds "
        f"{counts.tied / 1e6:.2f}M parameters.",
        f"  Tools that walk modules (torchinfo, state_dict()) see the matrix twice: "
        f"{counts.untied / 1e6:.2f}M - {head / 1e6:.2f}M = {counts.tied / 1e6:.2f}M.",
    ]
    return "\n".join(lines)
