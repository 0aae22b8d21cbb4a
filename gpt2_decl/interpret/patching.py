"""Activation patching from a clean run into a corrupted one, as batched forward passes, and its
first-order estimate from gradients (attribution patching).

`patch_sweep` puts the clean run's activation of one site into the corrupted run, one block
and one position (or one head) at a time, and measures a metric of each patched run. The runs
go as batches: each row of a batch is the corrupted prompt with its own block and position
patched, by a per-row mask over every block's site (rows patch nothing where their block is
not), so a batch is one forward pass, and under `gpt2_decl.compile` one graph for every batch.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from gpt2_decl.core.activations import Patch, axes_of, resolve

Metric = Callable[[Tensor], Tensor]  # logits [rows, seq, vocab] -> one value per row [rows]


def patch_sweep(model, clean: Tensor, corrupted: Tensor, site: str, metric: Metric, *,
                per: str = "position", batch: int = 16, runner=None) -> Tensor:
    """The metric of the corrupted run with block ℓ's `site` taken from the clean run at
    position p alone ([n_layer, seq]), or at head h alone, every position (`per="head"`:
    [n_layer, n_head]). `clean` and `corrupted` are [1, seq] prompts of one length; `runner`
    is what runs the passes (the model, or it compiled; default the model)."""
    runner = runner or model
    config = model.config
    _check_prompts(clean, corrupted)
    if per not in ("position", "head"):
        raise ValueError(f"per must be 'position' or 'head', got {per!r}")
    names = resolve(f"blocks.*.{site}", config, "patch_sweep")
    axes = axes_of(names[0])
    if per == "head" and "head" not in axes:
        raise ValueError(f"per='head' needs a site with a head axis (q, k, v, scores, pattern, "
                         f"z), not {site} ({' '.join(axes)})")
    seq = clean.shape[1]
    with torch.no_grad():
        _, cache = runner.run_with_cache(clean, names)
        width = seq if per == "position" else config.n_head
        jobs = [(layer, index) for layer in range(config.n_layer) for index in range(width)]
        results = []
        for start in range(0, len(jobs), batch):
            chunk = jobs[start:start + batch]
            rows = chunk + [chunk[-1]] * (batch - len(chunk))  # one shape for every batch
            patches = {}
            for layer, name in enumerate(names):
                chosen = torch.zeros(batch, width, dtype=torch.bool, device=clean.device)
                for row, (job_layer, index) in enumerate(rows):
                    chosen[row, index] = job_layer == layer
                patches[name] = Patch(cache[name], **{"positions" if per == "position"
                                                      else "heads": chosen})
            logits = runner.run_with_patches(corrupted.expand(batch, seq), patches)
            results.append(metric(logits)[:len(chunk)])
    return torch.cat(results).reshape(config.n_layer, width)


def attribution_patching(model, clean: Tensor, corrupted: Tensor, site: str,
                         metric: Metric, runner=None) -> Tensor:
    """The first-order estimate of `patch_sweep`'s effect on the metric, from one corrupted
    run and its gradients: (clean - corrupted activation) times the metric's gradient at the
    corrupted run, summed over the site's last axis: [n_layer, seq] ([n_layer, n_head, seq] for
    a site with a head axis)."""
    runner = runner or model
    _check_prompts(clean, corrupted)
    names = resolve(f"blocks.*.{site}", model.config, "attribution_patching")
    with torch.no_grad():
        _, clean_cache = runner.run_with_cache(clean, names)
    logits, cache = runner.run_with_cache(corrupted, names, gradients=True)
    metric(logits).sum().backward()
    return torch.stack([(_difference(clean_cache[name], cache[name]) * cache.grad(name)).sum(-1)[0]
                        for name in names]).detach()


def _difference(clean: Tensor, corrupted: Tensor) -> Tensor:
    """clean - corrupted, 0 where they are equal: the scores of hidden keys are -inf in both."""
    return torch.where(clean == corrupted, 0.0, clean - corrupted)


def _check_prompts(clean: Tensor, corrupted: Tensor) -> None:
    if clean.shape != corrupted.shape or clean.dim() != 2 or clean.shape[0] != 1:
        raise ValueError(f"clean and corrupted must be two [1, seq] prompts of one length, got "
                         f"{list(clean.shape)} and {list(corrupted.shape)}")
