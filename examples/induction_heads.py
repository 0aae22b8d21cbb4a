"""Induction heads, found and ablated with the capture API (Olsson et al., "In-context Learning
and Induction Heads", 2022).

A two-layer GPT-2 is trained on random tokens that repeat: each row is a random stretch of 6 to
24 tokens, repeated until the context is full. Nothing but the earlier copies predicts a token,
so the model has to find them. Then, on held-out rows of random tokens in which one stretch
repeats once at a random place (the paper's test):

- the loss on the repeat falls far below the loss on its first copy;
- capturing every layer's attention pattern finds the induction heads: from each token of the
  repeat they attend to the token after that token's first occurrence (and the layer before
  has a previous-token head, which attends one position back, for them to build on);
- zeroing those heads' outputs (a patch of `z`) brings the repeat's loss back up.

python examples/induction_heads.py                  # a few minutes on two cores
python examples/induction_heads.py --out runs/induction --steps 5000
"""

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gpt2_decl
from gpt2_decl import GPT2, GPT2Config, Patch
from gpt2_decl.interpret.pictures import _figure, _save, draw_attention

CONFIG = GPT2Config(vocab_size=64, n_ctx=48, d_model=64, n_layer=2, n_head=4, seed=0)
# The repeated stretch is this many tokens long, its first copy starting anywhere it fits.
SHORTEST, LONGEST = 6, 24
# A head that puts at least this much attention on the induction position is counted as one.
INDUCTION_SCORE = 0.3


def periodic(batch: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, n_ctx] rows, each a stretch of random tokens of random length repeated until the
    context is full: the training data."""
    tokens = torch.randint(CONFIG.vocab_size, (batch, CONFIG.n_ctx), generator=generator)
    lengths = torch.randint(SHORTEST, LONGEST + 1, (batch, 1), generator=generator)
    return tokens.gather(1, torch.arange(CONFIG.n_ctx) % lengths)


def repeats(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, n_ctx] random tokens, each row with a stretch of random length repeated once
    right after itself at a random start; and each row's (start, length): the test data."""
    tokens = torch.randint(CONFIG.vocab_size, (batch, CONFIG.n_ctx), generator=generator)
    lengths = torch.randint(SHORTEST, LONGEST + 1, (batch,), generator=generator)
    starts = (torch.rand(batch, generator=generator) * (CONFIG.n_ctx - 2 * lengths + 1)).long()
    for row in range(batch):
        start, length = int(starts[row]), int(lengths[row])
        tokens[row, start + length:start + 2 * length] = tokens[row, start:start + length]
    return tokens, torch.stack([starts, lengths], dim=1)


def stretch_losses(logits: torch.Tensor, tokens: torch.Tensor, spans: torch.Tensor
                   ) -> tuple[float, float]:
    """The next-token loss on the first copy of each stretch and on its repeat (every token
    but the first of each copy, which nothing predicts)."""
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(),
                             reduction="none").view(tokens.shape[0], -1)
    first, repeat = [], []
    for row, (start, length) in enumerate(spans.tolist()):
        first.append(losses[row, start:start + length - 1])
        repeat.append(losses[row, start + length:start + 2 * length - 1])
    return torch.cat(first).mean().item(), torch.cat(repeat).mean().item()


def head_scores(patterns: dict[int, torch.Tensor], spans: torch.Tensor, offset) -> torch.Tensor:
    """[n_layer, n_head]: the mean attention from each token of the repeat to the position
    `offset(length)` before it."""
    scores = torch.zeros(CONFIG.n_layer, CONFIG.n_head)
    for layer, pattern in patterns.items():  # [batch, head, seq, seq]
        taken = []
        for row, (start, length) in enumerate(spans.tolist()):
            queries = torch.arange(start + length + 1, start + 2 * length)
            keys = queries - offset(length)
            taken.append(pattern[row, :, queries, keys])  # [head, queries]
        scores[layer] = torch.cat(taken, dim=1).mean(1)
    return scores


def train(model: GPT2, steps: int, generator: torch.Generator) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model.train()
    for step in range(steps):
        tokens = periodic(32, generator)
        logits = model(tokens, check_values=False)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}", flush=True)
    model.eval()


def draw_scores(induction: torch.Tensor, previous: torch.Tensor, path: Path) -> Path:
    figure = _figure(7, 2.6)
    for index, (scores, title) in enumerate(((previous, "previous-token score"),
                                             (induction, "induction score"))):
        axes = figure.add_subplot(1, 2, index + 1)
        image = axes.imshow(scores.numpy(), cmap="Oranges", vmin=0, vmax=1)
        axes.set(title=title, xlabel="head", ylabel="layer")
        axes.set_xticks(range(CONFIG.n_head))
        axes.set_yticks(range(CONFIG.n_layer))
        figure.colorbar(image, ax=axes, shrink=0.8)
    return _save(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    parser.add_argument("--out", type=Path, default=Path("runs/induction"),
                        help="where the pictures go (default: runs/induction)")
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = GPT2(CONFIG)
    start = time.perf_counter()
    train(model, args.steps, generator)
    print(f"trained in {time.perf_counter() - start:.0f} s")

    tokens, spans = repeats(256, torch.Generator().manual_seed(1))  # held out
    names = [f"blocks.{layer}.pattern" for layer in range(CONFIG.n_layer)]
    with torch.no_grad():
        logits, cache = gpt2_decl.compile(model).run_with_cache(tokens, names)
    first, repeat = stretch_losses(logits, tokens, spans)
    print(f"loss on the first copy {first:.3f} (chance: ln {CONFIG.vocab_size} = "
          f"{math.log(CONFIG.vocab_size):.3f}), on the repeat {repeat:.3f}")

    patterns = {layer: cache[f"blocks.{layer}.pattern"] for layer in range(CONFIG.n_layer)}
    induction = head_scores(patterns, spans, lambda length: length - 1)
    previous = head_scores(patterns, spans, lambda length: 1)
    for layer in range(CONFIG.n_layer):
        print(f"block {layer}: induction scores "
              + " ".join(f"{score:.2f}" for score in induction[layer].tolist())
              + ", previous-token scores "
              + " ".join(f"{score:.2f}" for score in previous[layer].tolist()))
    found = [(layer, head) for layer in range(CONFIG.n_layer) for head in range(CONFIG.n_head)
             if induction[layer, head] >= INDUCTION_SCORE]
    print(f"induction heads (score >= {INDUCTION_SCORE}): "
          f"{', '.join(f'block {layer} head {head}' for layer, head in found) or 'none'}")

    patches = {}
    for layer, head in found:
        heads = patches.setdefault(f"blocks.{layer}.z", [])
        heads.append(head)
    with torch.no_grad():
        ablated = model.run_with_patches(tokens, {name: Patch(0.0, heads=heads)
                                                  for name, heads in patches.items()})
    ablated_first, ablated_repeat = stretch_losses(ablated, tokens, spans)
    print(f"with the induction heads zeroed: loss on the first copy {ablated_first:.3f}, "
          f"on the repeat {ablated_repeat:.3f}")

    row = int(spans[:, 1].argmax())  # the longest repeat, to draw
    best = max(found, key=lambda chosen: induction[chosen]) if found else (1, 0)
    labels = [str(token) for token in tokens[row].tolist()]
    written = [draw_scores(induction, previous, args.out / "head-scores.png"),
               draw_attention(patterns[best[0]][row], labels, args.out / "patterns.png",
                              f"block {best[0]}: attention on a repeated stretch "
                              f"(head {best[1]} is the strongest induction head)")]
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
