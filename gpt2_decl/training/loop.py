"""Training GPT-2 on text, on one process or many (torchrun + DistributedDataParallel).

Each optimizer step: random windows of the corpus (`data.py`), next-token cross entropy over
`grad_accum` micro-steps, gradient clipping, AdamW with weight decay on matrices only, and a
learning rate warmed up linearly then decayed on a cosine. Every `eval_every` steps the
held-out loss; every `checkpoint_every` steps, at the end, and on Ctrl-C (SIGINT) or SIGTERM, a
checkpoint (`checkpoints.py`) and the loss curves (`progress.py`), written by the main process,
which holds the output directory for the run's life (`storage.lock`).

Distributed: launched by torchrun, each of the N processes draws the same global batch of window
starts and reads its own 1/N of it (see `WindowSampler`). One optimizer step sees
batch_size * grad_accum * world_size windows of n_ctx tokens (the global batch).
"""

import contextlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from gpt2_decl.core.compiling import compile as compile_model
from gpt2_decl.core.counting import training_flops_per_token
from gpt2_decl.core.devices import matmul_roofline
from gpt2_decl.core.model import GPT2
from gpt2_decl.core.shapes import check_shapes
from gpt2_decl.core.typecheck import is_typechecked, typechecked
from gpt2_decl.storage.lock import DirectoryLock
from gpt2_decl.training.checkpoints import (
    CHECKPOINTS_DIR,
    NoCheckpointError,
    latest_checkpoint,
    load_resumable,
    read_training_options,
    save_checkpoint,
)
from gpt2_decl.training.data import Tokenizer, WindowSampler, load_corpus, split_tokens
from gpt2_decl.training.distributed import ProcessGroup, StopSignals, process_group
from gpt2_decl.training.evaluation import check_fits, mean_loss, next_token_loss
from gpt2_decl.training.options import ARCHITECTURE_OPTIONS, PATH_OPTIONS, TrainConfig
from gpt2_decl.training.progress import Progress

ADAM_BETAS = (0.9, 0.95)
# Where AdamW has a fused kernel: one pass over the parameters, and no per-parameter host read of
# the step count (which the other implementations make).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


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
    """The loss became NaN or infinite; the run stopped before saving anything of that step."""

    def __init__(self, message: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or a KeyboardInterrupt from `on_step` stopped training; a checkpoint was
    saved first."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"training interrupted after step {step}; checkpoint: {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


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

    Raises NonFiniteLossError when the loss stops being finite, TrainingInterrupted (a
    KeyboardInterrupt) after saving a checkpoint on Ctrl-C, and DirectoryInUseError when another
    run holds `out`.
    """
    # Paths are kept as strings: the options are saved as JSON beside each checkpoint.
    for name in PATH_OPTIONS:
        if options.get(name) is not None:
            options[name] = os.fspath(options[name])
    config = TrainConfig(data=os.fspath(data), out=os.fspath(out), **options)
    with process_group(config.device) as group, typechecked(config.typecheck or is_typechecked()):
        trainer = Trainer(config, group, tokenizer, on_step)
        with trainer.holding_out_directory():
            return trainer.run()


class Trainer:
    """One run: the model, optimizer, data and progress; `run` is the loop."""

    def __init__(self, config: TrainConfig, group: ProcessGroup, tokenizer: Tokenizer | None,
                 on_step: Callable[[StepReport], object] | None):
        self.config, self.group, self.on_step = config, group, on_step
        self.device, self.out = group.device, Path(config.out)
        self.step, self.checkpoint, self.saved_step = 0, None, None
        self.history: dict[str, list] | None = None
        # Everything that can be checked without the output directory is checked before it is
        # made: a run that cannot start leaves nothing behind.
        self.corpus = self._load_corpus(tokenizer)
        if config.resume and not self.out.is_dir():
            raise NoCheckpointError(f"resume: {self.out} does not exist, so it holds no checkpoint")
        self.model = None if config.resume else self._new_model()
        if self.model is not None:
            check_fits(self.corpus.tokens, self.model.config)
            split_tokens(self.corpus.tokens, config.val_fraction, self.model.config.n_ctx)

    def run(self) -> TrainResult:
        """The loop. Until `steps`: one optimizer step, its report, and when due, the held-out
        loss and a checkpoint; a stop request (Ctrl-C, SIGTERM, on_step) saves, then stops."""
        config = self.config
        self.start()
        progress, loss = self.progress, None
        with contextlib.closing(progress), StopSignals() as stop:
            while self.step < config.steps:
                lr = learning_rate(self.step, config)
                batches = [self.sampler.sample(self.device) for _ in range(config.grad_accum)]
                loss, stop_requested = self.read(self.train_step(batches, lr, stop.requested))
                self.check_finite(loss)
                self.step += 1
                progress.step(self.step, loss, lr)
                progress.pause()
                if self.step % config.eval_every == 0 or self.step == config.steps:
                    progress.evaluation(self.step, loss, self.evaluate())
                if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                    self.save()
                if stop_requested:
                    raise TrainingInterrupted(self.step, self.save())
                self.report(loss, lr)
                progress.resume()
        return self.result(loss)

    def train_step(self, batches: list[tuple[Tensor, Tensor]], lr: float,
                   stop_requested: bool) -> Tensor:
        """Forward and backward passes over this process's share of the global batch (one
        micro-step per (inputs, targets) of `batches`), then clipping and the optimizer. Returns,
        still on the device, the mean loss and the number of processes asked to stop, summed
        over the processes: nothing here waits for the device."""
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro_step, (inputs, targets) in enumerate(batches):
            # Gradients are all-reduced once per step, on the last micro-step's backward.
            skip_sync = self.ddp is not None and micro_step < config.grad_accum - 1
            with self.ddp.no_sync() if skip_sync else contextlib.nullcontext():
                with self.autocast:
                    loss = self.loss(self.forward(inputs, check_values=False), targets)
                (loss / config.grad_accum).backward()
            loss_sum += loss.detach()
        if config.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        stops = torch.full((), float(stop_requested), device=self.device)
        return self.group.all_reduce(torch.stack([loss_sum / config.grad_accum, stops]))

    def read(self, totals: Tensor) -> tuple[float, bool]:
        """The step's mean loss over the processes, and whether any of them must stop."""
        loss_sum, stops = totals.tolist()
        return loss_sum / self.group.world_size, stops > 0

    def check_finite(self, loss: float) -> None:
        if math.isfinite(loss):
            return
        last_good = (f"the last good checkpoint is {self.checkpoint}" if self.checkpoint
                     else "no checkpoint was written yet")
        raise NonFiniteLossError(
            f"the training loss is {loss} at step {self.step + 1}; stopped without saving that "
            f"step; {last_good}. Try a lower --lr, a longer --warmup-steps or --clip-grad, then "
            "--resume",
            step=self.step + 1, checkpoint=self.checkpoint,
        )

    def evaluate(self) -> float:
        """Mean held-out loss over the first eval_batches global batches of windows: eager,
        outside DDP, the same windows every time, shared out by rank."""
        config = self.config
        max_windows = config.eval_batches * config.batch_size * self.group.world_size
        loss, _ = mean_loss(self.model, self.val_tokens, config.batch_size, self.device,
                            self.autocast, max_windows, self.group)
        return loss

    def report(self, loss: float, lr: float) -> None:
        if self.on_step is None:
            return
        try:
            self.on_step(StepReport(self.step, loss, lr, self.model))
        except KeyboardInterrupt:
            raise TrainingInterrupted(self.step, self.save()) from None

    def save(self) -> Path:
        """A checkpoint of the completed steps (written by the main process; every process
        returns its path)."""
        if self.saved_step != self.step:
            if self.group.is_main:
                self.checkpoint = save_checkpoint(
                    self.out, self.model, self._state(), asdict(self.config),
                    self.config.keep_checkpoints,
                )
                self.progress.save()
            else:
                self.checkpoint = self.out / CHECKPOINTS_DIR / f"step-{self.step:07d}"
            self.saved_step = self.step
        return self.checkpoint

    # --- setting up, resuming, finishing ---------------------------------------------------

    @contextlib.contextmanager
    def holding_out_directory(self):
        """The main process holds `out` for the run (the others wait for it to)."""
        if not self.group.is_main:
            self.group.barrier()
            yield
            return
        try:
            lock = DirectoryLock(self.out)
            lock.acquire()
        except OSError as error:
            raise ValueError(f"cannot write to {self.out}: {error.strerror or error}") from None
        try:
            self.group.barrier()
            yield
        finally:
            lock.release()

    def start(self) -> None:
        """The model, optimizer and data position: new, from init_from, or resumed."""
        config, group = self.config, self.group
        resumed = self._resumed()
        if resumed:
            self.model = resumed.model
            check_fits(self.corpus.tokens, self.model.config)
        n_ctx = self.model.config.n_ctx
        self.train_tokens, self.val_tokens = split_tokens(
            self.corpus.tokens, config.val_fraction, n_ctx
        )
        self.sampler = WindowSampler(self.train_tokens, n_ctx, config.batch_size, config.seed,
                                     group.rank, group.world_size)
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, config.weight_decay), lr=config.lr, betas=ADAM_BETAS,
            fused=self.device.type in FUSED_ADAMW_DEVICES,
        )
        if is_typechecked():
            # Every layer's shapes, forward and backward, before the first step: also where the
            # step itself is compiled (and so not checked inside).
            check_shapes(self.model, config.batch_size, n_ctx, training=True)
        self.forward, self.ddp = self._build_forward()
        # Compiled apart from the model, the loss's float32 upcast of the logits and its
        # gradient are fused into its kernels, never batch x seq x vocab floats in memory.
        self.loss = (torch.compile(next_token_loss, fullgraph=True) if self.config.compile
                     else next_token_loss)
        torch.manual_seed(config.seed)
        if resumed:
            self._restore(resumed.state)
            self.checkpoint = resumed.directory
        self.first_step = self.step
        tokens_per_step = config.batch_size * config.grad_accum * group.world_size * n_ctx
        self.progress = Progress(self.out, config.steps, self.step, tokens_per_step, self.history,
                                 show=config.progress and group.is_main, write=group.is_main)

    def _resumed(self):
        config = self.config
        existing = latest_checkpoint(self.out)
        if not config.resume:
            if existing is not None:
                raise FileExistsError(
                    f"{self.out} already holds a checkpoint ({existing.name}): pass resume "
                    "(--resume) to continue it, or choose another out directory"
                )
            return None
        resumed = load_resumable(self.out, self.device, self._warn)
        saved = read_training_options(resumed.directory) or {}
        changed = [f"{name} {saved.get(name)!r} -> {getattr(config, name)!r}"
                   for name in ARCHITECTURE_OPTIONS if saved.get(name) != getattr(config, name)]
        if changed:
            raise ValueError(
                f"resume: the architecture options differ from the checkpoint's "
                f"({'; '.join(changed)}); resume with the options it was started with"
            )
        resumed.model.train()
        return resumed

    def _new_model(self) -> GPT2:
        config = self.config
        if config.init_from is not None:
            model = GPT2.from_pretrained(config.init_from, dtype=torch.float32, device=self.device)
        else:
            model = GPT2(config.model_config()).to(self.device)
        return model.train()

    def _load_corpus(self, tokenizer: Tokenizer | None):
        # The main process tokenizes (if the cache is cold) while the others wait, then they
        # read its file.
        group = self.group
        if not group.is_main:
            group.barrier()
        corpus = load_corpus(self.config.data, tokenizer, self.config.cache_dir)
        if group.is_main:
            group.barrier()
            if corpus.skipped:
                names = ", ".join(str(path) for path in corpus.skipped[:5])
                more = f" and {len(corpus.skipped) - 5} more" if len(corpus.skipped) > 5 else ""
                self._warn(f"note: skipped {len(corpus.skipped)} files that are not text: "
                           f"{names}{more}")
        return corpus

    def _build_forward(self) -> tuple[Callable[..., Tensor], torch.nn.Module | None]:
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
            "history": self.progress.history,
        }

    @property
    def autocast(self) -> torch.autocast:
        dtype = self.config.compute_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def result(self, loss: float | None) -> TrainResult:
        checkpoint = self.save()
        self.group.barrier()
        peak = None
        if self.config.measure_mfu:
            # Every process measures at once (on a shared CPU they compete, as in training).
            (peak,) = self.group.sum([matmul_roofline(self.device, self.config.compute_dtype)])
        return TrainResult(
            step=self.step, train_loss=loss, eval_loss=self.progress.last_eval_loss,
            tokens_per_s=self.progress.tokens_per_s,
            flops_per_token=training_flops_per_token(self.model.config, self.model.config.n_ctx),
            peak_flops=peak, checkpoint=checkpoint, history=self.progress.history,
        )

    def _warn(self, message: str) -> None:
        if self.group.is_main:
            print(message, file=sys.stderr)
