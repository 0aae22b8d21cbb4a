"""Training GPT-2 on text, on one process or many (torchrun + DistributedDataParallel).

The loop: random windows of the corpus (`data.py`), next-token cross entropy, AdamW with weight
decay on matrices only, linear warm-up then cosine decay of the learning rate, gradient clipping,
optional bf16 autocast and `torch.compile`. Every `checkpoint_every` steps, at the end, and on
Ctrl-C (SIGINT) or SIGTERM, rank 0 writes a checkpoint (laid out as `checkpoints.py` says; the
signals and processes are `distributed.py`'s) and the loss curves:

    OUT/loss.png, OUT/metrics.json   (train every step, held-out every eval)

Distributed: launched by torchrun, each of the N processes draws the same global batch of window
starts and reads its own 1/N of it (see `WindowSampler`). One optimizer step sees
batch_size * grad_accum * world_size windows of n_ctx tokens (the global batch).
"""

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from gpt2_decl.atomic import atomic_write
from gpt2_decl.bench import forward_flops_per_token, measure_matmul_roofline, synchronize
from gpt2_decl.checkpoints import (
    LATEST,
    checkpoint_dir,
    latest_checkpoint,
    load_state,
    read_training_options,
    resolve_checkpoint,
    save_checkpoint,
)
from gpt2_decl.compiling import compile as compile_model
from gpt2_decl.config import DTYPES, GPT2Config
from gpt2_decl.data import (
    TokenCorpus,
    Tokenizer,
    WindowSampler,
    evaluation_batches,
    load_corpus,
    split_tokens,
)
from gpt2_decl.distributed import ProcessGroup, StopSignals, process_group
from gpt2_decl.model import GPT2
from gpt2_decl.typecheck import is_typechecked, shape_checked, typechecked

DEFAULT_PRESET = "small"
ARCHITECTURE_OPTIONS = (
    "preset", "n_layer", "n_head", "d_model", "n_ctx", "vocab_size", "init_from"
)
PATH_OPTIONS = ("init_from", "cache_dir")
ADAM_BETAS = (0.9, 0.95)
# With no --min-lr the cosine ends at a tenth of the peak learning rate, as in GPT-3.
MIN_LR_RATIO = 0.1
# The forward pass and the backward (twice its work: gradients of inputs and of weights).
TRAINING_FLOPS_PER_FORWARD = 3

PLOT_FILE = "loss.png"
METRICS_FILE = "metrics.json"


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


@dataclass(frozen=True)
class StepReport:
    """What `on_step` receives after each optimizer step (raise KeyboardInterrupt to stop)."""

    step: int  # optimizer steps completed
    loss: float  # mean training loss of this step's global batch
    lr: float
    model: GPT2


@dataclass
class TrainResult:
    step: int
    train_loss: float | None
    eval_loss: float | None
    tokens_per_s: float | None  # all processes together, steady state (the first step excluded)
    flops_per_token: int
    peak_flops: float | None  # measured matmul FLOP/s, summed over processes
    checkpoint: Path | None
    history: dict[str, list] = field(repr=False)

    @property
    def mfu(self) -> float | None:
        """Model FLOPs utilisation: achieved training FLOP/s over the measured matmul peak."""
        if self.tokens_per_s is None or not self.peak_flops:
            return None
        return self.tokens_per_s * self.flops_per_token / self.peak_flops

    @property
    def eval_perplexity(self) -> float | None:
        return None if self.eval_loss is None else math.exp(self.eval_loss)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the step was not applied and no checkpoint was written."""

    def __init__(self, message: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or a KeyboardInterrupt from `on_step` stopped training; a checkpoint was
    saved first."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"training interrupted after step {step}; checkpoint: {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def check_fits(tokens: np.ndarray, config: GPT2Config) -> None:
    """Refuse data that the model cannot read: ids beyond its vocabulary, or less than a window."""
    if len(tokens) < config.n_ctx + 1:
        raise ValueError(
            f"the data has {len(tokens)} tokens, fewer than one window of n_ctx + 1 = "
            f"{config.n_ctx + 1}"
        )
    largest = int(np.max(tokens))
    if largest >= config.vocab_size:
        raise ValueError(
            f"the data holds token id {largest}, but the model's vocabulary has "
            f"{config.vocab_size} ids; raise vocab_size (--vocab-size) or use the model's tokenizer"
        )


def learning_rate(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up over `warmup_steps`,
    then a cosine from `lr` down to the final rate at `steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return config.final_lr + cosine * (config.lr - config.final_lr)


def parameter_groups(model: GPT2, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices (every block's weights, the tied token embedding / output head, the
    position embedding) decay; biases and LayerNorm gains and shifts do not. `parameters()`
    yields the tied matrix once, so it is updated once."""
    parameters = list(model.parameters())
    return [
        {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
    ]


@shape_checked
def next_token_loss(
    logits: Float[Tensor, "batch seq vocab"], targets: Int[Tensor, "batch seq"]
) -> Float[Tensor, ""]:
    """Mean cross entropy of each position's logits against the token that follows it."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


def train(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tokenizer: Tokenizer | None = None,
    on_step: Callable[[StepReport], object] | None = None,
    **options,
) -> TrainResult:
    """Train a GPT-2 on the text at `data`, writing checkpoints and plots into `out`.

    `options` are `TrainConfig`'s fields (preset, n_layer, ..., steps, lr, resume, device, ...).
    `tokenizer` defaults to `GPT2Tokenizer`; any object with `encode(str) -> list[int]` and
    `eot_id` works (give a matching `vocab_size`). `on_step` is called on every process after
    each optimizer step. Run under torchrun, this trains with DistributedDataParallel.

    Raises NonFiniteLossError when the loss stops being finite, and TrainingInterrupted (a
    KeyboardInterrupt) after saving a checkpoint on Ctrl-C.
    """
    # Paths are kept as strings: the options are saved as JSON beside each checkpoint.
    for name in PATH_OPTIONS:
        if options.get(name) is not None:
            options[name] = os.fspath(options[name])
    config = TrainConfig(data=os.fspath(data), out=os.fspath(out), **options)
    with process_group(config.device) as group, typechecked(config.typecheck or is_typechecked()):
        return _Run(config, group, tokenizer, on_step).run()


# --- plots -------------------------------------------------------------------------------------


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


# --- the run -----------------------------------------------------------------------------------


class _Run:
    def __init__(
        self,
        config: TrainConfig,
        group: ProcessGroup,
        tokenizer: Tokenizer | None,
        on_step: Callable[[StepReport], object] | None,
    ):
        self.config, self.group, self.on_step = config, group, on_step
        self.out = Path(config.out)
        if group.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.device = group.device
        self.checkpoint = latest_checkpoint(self.out)
        if config.resume and self.checkpoint is None:
            raise FileNotFoundError(f"resume: {self.out} holds no checkpoint ({LATEST} is missing)")
        if not config.resume and self.checkpoint is not None:
            raise FileExistsError(
                f"{self.out} already holds a checkpoint ({self.checkpoint.name}): pass resume "
                f"(--resume) to continue it, or choose another out directory"
            )
        state = load_state(self.checkpoint) if config.resume else None
        if state is not None:
            self._check_same_architecture(read_training_options(self.checkpoint) or {})

        self.model = self._build_model()
        corpus = self._load_corpus(tokenizer)
        self.n_ctx = self.model.config.n_ctx
        self.train_tokens, self.val_tokens = split_tokens(
            corpus.tokens, config.val_fraction, self.n_ctx
        )
        self.sampler = WindowSampler(
            self.train_tokens, self.n_ctx, config.batch_size, config.seed,
            group.rank, group.world_size,
        )
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, config.weight_decay), lr=config.lr, betas=ADAM_BETAS,
            fused=self.device.type == "cuda",
        )
        self.forward, self.ddp = self._build_forward()
        self.step = 0
        self.history: dict[str, list] = {"train": [], "eval": []}
        self.saved_step: int | None = None
        torch.manual_seed(config.seed)
        if state is not None:
            self._restore(state)

    def _check_same_architecture(self, saved: dict) -> None:
        changed = [
            f"{name} {saved.get(name)!r} -> {getattr(self.config, name)!r}"
            for name in ARCHITECTURE_OPTIONS
            if saved.get(name) != getattr(self.config, name)
        ]
        if changed:
            raise ValueError(
                f"resume: the architecture options differ from the checkpoint's "
                f"({'; '.join(changed)}); resume with the options it was started with"
            )

    def _build_model(self) -> GPT2:
        config = self.config
        if config.resume:
            model = GPT2.from_pretrained(self.checkpoint, dtype=torch.float32, device=self.device)
        elif config.init_from is not None:
            model = GPT2.from_pretrained(config.init_from, dtype=torch.float32, device=self.device)
        else:
            model = GPT2(config.model_config()).to(self.device)
        return model.train()

    def _load_corpus(self, tokenizer: Tokenizer | None) -> TokenCorpus:
        # Rank 0 tokenizes (if the cache is cold) while the others wait, then they read its file.
        if not self.group.is_main:
            self.group.barrier()
        corpus = load_corpus(self.config.data, tokenizer, self.config.cache_dir)
        if self.group.is_main:
            self.group.barrier()
        check_fits(corpus.tokens, self.model.config)
        return corpus

    def _build_forward(self) -> tuple[Callable[[Tensor], Tensor], torch.nn.Module | None]:
        """The callable that computes logits in training: the model, compiled or not, and
        wrapped in DDP when distributed. DDP wraps the compiled module (it is an nn.Module sharing
        the model's parameters, the tied matrix once), so its hooks see every gradient."""
        compiled = compile_model(self.model) if self.config.compile else None
        if not self.group.distributed:
            return compiled or self.model, None
        module = compiled.compiled if compiled is not None else self.model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
        return ddp, ddp

    def _restore(self, state: dict) -> None:
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if self.device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.history = state["history"]
        self.saved_step = self.step

    def _state(self) -> dict:
        """All but the weights that a resume needs, as plain tensors, lists and numbers."""
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": {"cpu": torch.get_rng_state(), "cuda": cuda_rng},
            "history": self.history,
        }

    def save(self) -> Path:
        """Write a checkpoint of the completed steps (on rank 0; every rank returns its path)."""
        if self.saved_step != self.step:
            if self.group.is_main:
                save_checkpoint(
                    self.out, self.model, self._state(), asdict(self.config),
                    self.config.keep_checkpoints,
                )
                self.write_plots()
            self.checkpoint = checkpoint_dir(self.out, self.step)
            self.saved_step = self.step
        return self.checkpoint

    def write_plots(self) -> None:
        if self.group.is_main:
            plot_losses(self.history, self.out / PLOT_FILE)
            with atomic_write(self.out / METRICS_FILE) as tmp:
                tmp.write_text(json.dumps(self.history) + "\n")

    @property
    def autocast(self) -> torch.autocast:
        dtype = self.config.compute_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def train_step(self, stop: StopSignals) -> tuple[float, float, bool]:
        """One optimizer step over the global batch: (mean loss, learning rate, whether any
        process was asked to stop: all of them then stop after the same step)."""
        config = self.config
        lr = learning_rate(self.step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro_step in range(config.grad_accum):
            inputs, targets = self.sampler.sample(self.device)
            # Gradients are all-reduced once per step, on the last micro-step's backward.
            last = micro_step == config.grad_accum - 1
            skip_sync = self.ddp is not None and not last
            with self.ddp.no_sync() if skip_sync else contextlib.nullcontext():
                with self.autocast:
                    loss = next_token_loss(self.forward(inputs), targets)
                (loss / config.grad_accum).backward()
            loss_sum += loss.detach()
        total, stops = self.group.sum([loss_sum.item() / config.grad_accum, float(stop.requested)])
        loss = total / self.group.world_size
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            last_good = (
                f"the last good checkpoint is {self.checkpoint}" if self.checkpoint
                else "no checkpoint was written yet"
            )
            raise NonFiniteLossError(
                f"the training loss is {loss} at step {self.step + 1} (lr {lr:.3g}); stopped "
                f"without applying the step; {last_good}. Try a lower --lr, a longer "
                f"--warmup-steps or --clip-grad, then --resume",
                step=self.step + 1,
                checkpoint=self.checkpoint,
            )
        if config.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, lr, stops > 0

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first eval_batches global batches' worth of held-out windows.

        Eager (not compiled) and outside DDP: the same windows every time, shared out by rank.
        """
        config, group = self.config, self.group
        max_windows = config.eval_batches * config.batch_size * group.world_size
        self.model.eval()
        loss_sum, count = 0.0, 0
        for inputs, targets in evaluation_batches(
            self.val_tokens, self.n_ctx, config.batch_size, self.device, max_windows,
            group.rank, group.world_size,
        ):
            with self.autocast:
                loss_sum += next_token_loss(self.model(inputs), targets).item() * targets.numel()
            count += targets.numel()
        self.model.train()
        total, tokens = group.sum([loss_sum, count])
        return total / tokens

    def run(self) -> TrainResult:
        config, group = self.config, self.group
        tokens_per_step = config.batch_size * config.grad_accum * group.world_size * self.n_ctx
        first_step = self.step
        timed_tokens, timed_seconds = 0, 0.0
        loss = None
        bar = tqdm(
            total=config.steps, initial=self.step, desc="train", dynamic_ncols=True,
            disable=not (config.progress and group.is_main),
        )
        with bar, StopSignals() as stop:
            while self.step < config.steps:
                started = time.perf_counter()
                loss, lr, stop_requested = self.train_step(stop)
                synchronize(self.device)
                elapsed = time.perf_counter() - started
                # The first step of a run pays for compilation and warm-up: not steady state.
                if self.step > first_step + 1:
                    timed_tokens += tokens_per_step
                    timed_seconds += elapsed
                self.history["train"].append([self.step, loss, lr])
                rate = timed_tokens / timed_seconds if timed_seconds else tokens_per_step / elapsed
                bar.set_postfix(
                    loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}", refresh=False
                )
                bar.update()
                if self.step % config.eval_every == 0 or self.step == config.steps:
                    self.log_evaluation(bar, loss)
                if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                    self.save()
                if stop_requested:
                    raise TrainingInterrupted(self.step, self.save())
                if self.on_step is not None:
                    try:
                        self.on_step(StepReport(self.step, loss, lr, self.model))
                    except KeyboardInterrupt:
                        raise TrainingInterrupted(self.step, self.save()) from None
        checkpoint = self.save()
        group.barrier()
        peak = self._measure_peak() if config.measure_mfu else None
        evals = self.history["eval"]
        return TrainResult(
            step=self.step,
            train_loss=loss,
            eval_loss=evals[-1][1] if evals else None,
            tokens_per_s=timed_tokens / timed_seconds if timed_seconds else None,
            flops_per_token=TRAINING_FLOPS_PER_FORWARD
            * forward_flops_per_token(self.model.config, self.n_ctx),
            peak_flops=peak,
            checkpoint=checkpoint,
            history=self.history,
        )

    def log_evaluation(self, bar: tqdm, train_loss: float) -> None:
        eval_loss = self.evaluate()
        self.history["eval"].append([self.step, eval_loss])
        if self.config.progress and self.group.is_main:
            bar.write(
                f"step {self.step}: train loss {train_loss:.4f}, held-out loss {eval_loss:.4f} "
                f"(perplexity {math.exp(eval_loss):.2f})"
            )
        self.write_plots()

    def _measure_peak(self) -> float:
        """The matmul roofline, measured by every process at once (on a shared CPU they compete,
        as they did in training), summed: the peak the whole run faced."""
        (total,) = self.group.sum([measure_matmul_roofline(self.device, self.config.compute_dtype)])
        return total


# --- evaluation of a checkpoint ----------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    loss: float
    tokens: int
    split: str
    checkpoint: Path

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


EVAL_SPLITS = ("val", "train", "all")


@torch.no_grad()
def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    *,
    split: str = "val",
    val_fraction: float | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    dtype: str = "float32",
    cache_dir: str | os.PathLike | None = None,
    tokenizer: Tokenizer | None = None,
) -> Evaluation:
    """Mean next-token loss of a checkpoint over consecutive n_ctx windows of `data`'s split.

    `checkpoint` is a weights directory or a training --out directory (its latest checkpoint).
    "val" is the held-out split that training used (its val_fraction, read from the checkpoint
    when training wrote it, else 0.1); "all" is the whole corpus.
    """
    from gpt2_decl import default_device

    if split not in EVAL_SPLITS:
        raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    directory = resolve_checkpoint(checkpoint)
    device = torch.device(device) if device else default_device()
    model = GPT2.from_pretrained(directory, dtype=torch.float32, device=device)
    n_ctx = model.config.n_ctx
    if val_fraction is None:
        options = read_training_options(directory) or {}
        val_fraction = options.get("val_fraction", TrainConfig.val_fraction)
    tokens = load_corpus(data, tokenizer, cache_dir).tokens
    if split != "all":
        tokens = split_tokens(tokens, val_fraction, n_ctx)[0 if split == "train" else 1]
    check_fits(tokens, model.config)
    max_windows = None if max_batches is None else max_batches * batch_size
    loss_sum, count = 0.0, 0
    autocast = torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "float32")
    for inputs, targets in evaluation_batches(tokens, n_ctx, batch_size, device, max_windows):
        with autocast:
            loss_sum += next_token_loss(model(inputs), targets).item() * targets.numel()
        count += targets.numel()
    return Evaluation(loss=loss_sum / count, tokens=count, split=split, checkpoint=directory)

