"""What a training run reports: the progress bar, the loss history, its plot and metrics file,
and the steady-state throughput."""

import json
import math
import time
from pathlib import Path

from tqdm import tqdm

from gpt2_decl.storage.atomic import atomic_write

PLOT_FILE = "loss.png"
METRICS_FILE = "metrics.json"


class Progress:
    """The run's loss history (`history["train"]`: [step, loss, lr]; `history["eval"]`: [step,
    loss]), shown on a progress bar and written to OUT on the main process."""

    def __init__(self, out: Path, steps: int, first_step: int, tokens_per_step: int,
                 history: dict[str, list] | None, *, show: bool, write: bool):
        self.out, self.write = out, write
        self.history = history or {"train": [], "eval": []}
        self.first_step, self.tokens_per_step = first_step, tokens_per_step
        self.timed_tokens, self.timed_seconds = 0, 0.0
        self.started = time.perf_counter()
        self.show = show
        self.bar = tqdm(total=steps, initial=first_step, desc="train", dynamic_ncols=True,
                        disable=not show)

    def step(self, step: int, loss: float, lr: float) -> None:
        """Record an optimizer step that ended now."""
        now = time.perf_counter()
        elapsed, self.started = now - self.started, now
        # The first step of a run pays for compilation and warm-up: not steady state.
        if step > self.first_step + 1:
            self.timed_tokens += self.tokens_per_step
            self.timed_seconds += elapsed
        self.history["train"].append([step, loss, lr])
        rate = self.tokens_per_s or self.tokens_per_step / elapsed
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}",
                             refresh=False)
        self.bar.update()

    def evaluation(self, step: int, train_loss: float, eval_loss: float) -> None:
        self.history["eval"].append([step, eval_loss])
        if self.show:
            self.bar.write(f"step {step}: train loss {train_loss:.4f}, held-out loss "
                           f"{eval_loss:.4f} (perplexity {math.exp(eval_loss):.2f})")
        self.save()

    def pause(self) -> None:
        """Leave the time until `resume` (evaluation, checkpoints) out of the throughput."""
        self.paused = time.perf_counter()

    def resume(self) -> None:
        self.started += time.perf_counter() - self.paused

    @property
    def tokens_per_s(self) -> float | None:
        return self.timed_tokens / self.timed_seconds if self.timed_seconds else None

    @property
    def last_eval_loss(self) -> float | None:
        return self.history["eval"][-1][1] if self.history["eval"] else None

    def save(self) -> None:
        """The loss curves as OUT/loss.png and OUT/metrics.json (main process only)."""
        if not self.write:
            return
        plot_losses(self.history, self.out / PLOT_FILE)
        with atomic_write(self.out / METRICS_FILE) as tmp:
            tmp.write_text(json.dumps(self.history) + "\n")

    def close(self) -> None:
        self.bar.close()


def plot_losses(history: dict[str, list], path: Path) -> None:
    """Training loss per step and held-out loss per evaluation, as a PNG (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if history["train"]:
        steps, losses, _ = zip(*history["train"], strict=True)
        axes.plot(steps, losses, linewidth=1, alpha=0.8, label="train")
    if history["eval"]:
        steps, losses = zip(*history["eval"], strict=True)
        axes.plot(steps, losses, "o-", label="held-out")
    axes.set(xlabel="optimizer step", ylabel="cross entropy (nats / token)", title="training loss")
    axes.grid(alpha=0.3)
    axes.legend()
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
