"""A speed-up plan: which CPU speed-ups to use for one kind of model, batch and machine, each
with the timings that chose it. `tune` measures and makes one; it can be printed, saved as JSON,
loaded, and applied (`gpt2_decl.compile(model, plan=plan)`, `model.generate(..., plan=plan)`).
Applying a plan times nothing: the same plan gives the same compiled graphs and tokens in
every run and process. See docs/cpu-speedups.md.
"""

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from gpt2_decl.core.compiling import CompiledGPT2, compile_with
from gpt2_decl.speedups import gemv
from gpt2_decl.speedups.decoding import DecodeStep
from gpt2_decl.speedups.machine import this_machine
from gpt2_decl.speedups.padded_vocab import PaddedVocab
from gpt2_decl.speedups.quantize import weights_kind
from gpt2_decl.speedups.rewrites import GraphRewrite
from gpt2_decl.speedups.upcast import UpcastLinear, UpcastProducts
from gpt2_decl.storage.atomic import atomic_write

FORMAT = "gpt2_decl speed-up plan"
VERSION = 1
# The speed-ups a plan chooses among (docs/cpu-speedups.md): forward passes' GEMMs upcast to
# float32 and their output head's vocabulary padded; a decoding step's products through
# inductor's C++ GEMM template or the GEMV kernel, its attention upcast; the prompt's products
# upcast or through the GEMV kernel.
FORWARD_CHOICES = ("upcast_products", "padded_vocab")
DECODING_CHOICES = ("gemm_template", "gemv_kernel", "upcast_attention", "upcast_prompt",
                    "gemv_prompt")


class PlanError(ValueError):
    """A plan that does not apply here, or a file that is not a plan."""


@dataclass(frozen=True)
class Choice:
    """One speed-up: whether the plan uses it, the milliseconds of each way timed, and why."""

    name: str
    used: bool
    times_ms: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def describe(self) -> str:
        timed = ", ".join(f"{way} {ms:.2f} ms" for way, ms in self.times_ms.items())
        return (f"{self.name}: {'on' if self.used else 'off'}"
                + (f" ({timed})" if timed else "") + (f"; {self.note}" if self.note else ""))


@dataclass(frozen=True)
class Plan:
    """Which speed-ups to use for `model` (its sizes, dtype and kind of weights) at `batch`
    rows, on `machine`: for forward passes, timed at `seq` tokens, and where `decoding`, for
    generation after prompts of `seq` tokens."""

    model: dict
    batch: int
    seq: int
    machine: dict
    choices: tuple[Choice, ...]
    decoding: bool = True

    def used(self, name: str) -> bool:
        return any(choice.name == name and choice.used for choice in self.choices)

    def describe(self) -> str:
        model = " ".join(f"{key}={value}" for key, value in self.model.items())
        features = " ".join(self.machine["features"]) or "no deciding features"
        tasks = "forward passes and decoding" if self.decoding else "forward passes"
        lines = [f"speed-up plan for GPT-2 {model}, batch {self.batch}, seq {self.seq}: {tasks}",
                 f"on {self.machine['cpu']} ({self.machine['architecture']}, {features}), "
                 f"{self.machine['threads']} threads"]
        return "\n".join(lines + [f"  {choice.describe()}" for choice in self.choices])

    __str__ = describe

    # Checks.

    def check(self, model: nn.Module, batch: int | None = None, *, decoding: bool = False
              ) -> None:
        """Raise PlanError, naming the mismatch, where this plan was made for another kind of
        model, batch or machine, or (`decoding`) for forward passes only."""
        if model.device.type != "cpu":
            raise PlanError(f"this plan is for a model on the CPU; the model is on "
                            f"{model.device}: compile it plain there (gpt2_decl.compile(model))")
        for key, value in describe_model(model).items():
            if self.model.get(key) != value:
                raise PlanError(f"this plan was made for a model with {key}={self.model.get(key)}"
                                f", not {value}: tune a plan for this model")
        if decoding and not self.decoding:
            raise PlanError("this plan was tuned for forward passes only: tune one with "
                            "decoding=True to generate with it")
        if batch is not None and batch != self.batch:
            raise PlanError(f"this plan was made for batch {self.batch}, not {batch}: tune "
                            f"one with batch={batch}")
        here = this_machine()
        for key, value in here.items():
            if self.machine.get(key) != value:
                raise PlanError(f"this plan was made on a machine with {key} "
                                f"{_words(self.machine.get(key))}; this one has {_words(value)}: "
                                "tune a plan here")

    # Applying it.

    def compile_forward(self, model: nn.Module) -> CompiledGPT2:
        """`model` compiled for forward passes, its weights frozen into the graph (inference
        only, as `gpt2_decl.compile(freeze=True)`), its GEMMs upcast and its output head's
        vocabulary padded where the plan says."""
        self.check(model)
        products = UpcastProducts() if self.used("upcast_products") else GraphRewrite()
        backend = PaddedVocab(products) if self.used("padded_vocab") else products
        return compile_with(model, backend, freeze=True, plan=self)

    def compile_decode_step(self, model: nn.Module) -> CompiledGPT2:
        """`model` compiled for one-token cached steps with the plan's decoding speed-ups."""
        self.check(model, decoding=True)
        if self.used("gemv_kernel"):
            gemv.load()  # built here, or KernelUnavailable in one line, not from inside compiling
        step = DecodeStep(gemv_kernel=self.used("gemv_kernel"),
                          gemm_template=self.used("gemm_template"),
                          upcast_attention=self.used("upcast_attention"))
        return compile_with(model, step, freeze=step.freezes, plan=self)

    def prefill(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Where a prompt runs before decoding: its products upcast, or through the GEMV
        kernel, where the plan says."""
        if self.used("gemv_prompt"):
            gemv.load()
            return gemv.GemvLinear()
        return UpcastLinear() if self.used("upcast_prompt") else contextlib.nullcontext()

    # Files.

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "model": self.model, "batch": self.batch,
                "seq": self.seq, "decoding": self.decoding, "machine": self.machine,
                "choices": [asdict(choice) for choice in self.choices]}

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON, replacing `path` in one step."""
        with atomic_write(path) as staging:
            staging.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """A plan saved by `save`; PlanError in one line for anything else."""
        try:
            data = json.loads(Path(path).read_text())
        except OSError as error:
            raise PlanError(f"cannot read the plan {str(path)!r}: {error.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise PlanError(f"{str(path)!r} is not a speed-up plan: not JSON ({error})") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: object, where: str = "the plan") -> "Plan":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PlanError(f"{where!r} is not a speed-up plan (no \"format\": {FORMAT!r})")
        if data.get("version") != VERSION:
            raise PlanError(f"{where!r} is a plan of version {data.get('version')!r}; this "
                            f"gpt2_decl reads version {VERSION}: tune a new one")
        try:
            choices = tuple(Choice(name=str(c["name"]), used=_bool(c["used"]),
                                   times_ms={str(k): float(v) for k, v in c["times_ms"].items()},
                                   note=str(c.get("note", ""))) for c in data["choices"])
            plan = cls(model=dict(data["model"]), batch=_positive(data["batch"]),
                       seq=_positive(data["seq"]), machine=dict(data["machine"]),
                       choices=choices, decoding=_bool(data["decoding"]))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise PlanError(f"{where!r} is a damaged speed-up plan ({type(error).__name__}: "
                            f"{error})") from None
        unknown = [choice.name for choice in choices
                   if choice.name not in FORWARD_CHOICES + DECODING_CHOICES]
        if unknown:
            raise PlanError(f"{where!r} names speed-ups this gpt2_decl does not have: "
                            f"{', '.join(unknown)}")
        return plan


def describe_model(model: nn.Module) -> dict:
    """What a plan records of a model: its sizes, dtype and kind of weights."""
    config = model.config
    return {"n_layer": config.n_layer, "n_head": config.n_head, "d_model": config.d_model,
            "vocab_size": config.vocab_size, "n_ctx": config.n_ctx,
            "dtype": str(model.dtype).removeprefix("torch."), "weights": weights_kind(model)}


def _words(value: object) -> str:
    if isinstance(value, list):
        return " ".join(value) if value else "none of the deciding features"
    return str(value)


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _positive(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value
