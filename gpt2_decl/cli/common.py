"""Options that several subcommands share, and turning them into torch objects."""

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator

import torch

from gpt2_decl.core import devices
from gpt2_decl.core.config import DTYPES, GPT2Config
from gpt2_decl.core.model import GPT2


def add_model_arguments(parser: argparse.ArgumentParser, preset: bool = True) -> None:
    if preset:
        parser.add_argument(
            "--preset",
            default="small",
            choices=sorted(GPT2Config.PRESETS),
            help="GPT-2 size (default: small)",
        )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="parameter dtype"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    parser.add_argument(
        "--typecheck",
        action="store_true",
        help="check every annotated shape and dtype at runtime (typechecked mode)",
    )


def resolve_device(name: str | None) -> torch.device:
    """The device `--device` names, or exit with a one-line error saying why it cannot be.

    On CUDA the commands let float32 matrix products use TF32 tensor cores (10-bit mantissas,
    float32 range), as most GPU training does; the library itself leaves that setting alone.
    """
    try:
        device = devices.resolve_device(name)
    except ValueError as error:
        raise SystemExit(f"error: --device: {error}") from None
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    return device


@contextlib.contextmanager
def explained_out_of_memory(device: torch.device, what: str) -> Iterator[None]:
    """Turn running out of memory into a one-line error naming the size tried and the memory
    there."""
    try:
        yield
    except Exception as error:
        cause = _out_of_memory_cause(error)
        if cause is None:
            raise
        if isinstance(cause, torch.OutOfMemoryError):
            there = ""
            if device.type == "cuda":
                free, total = torch.cuda.mem_get_info(device)
                there = (f" ({torch.cuda.get_device_name(device)}, {total / 2**30:.1f} GiB, "
                         f"{free / 2**30:.1f} GiB free)")
            raise SystemExit(f"error: out of memory on {device}{there} {what}; try smaller "
                             "sizes") from None
        raise SystemExit(f"error: out of memory on {device} {what}: "
                         f"{str(cause).splitlines()[0]}; try smaller sizes") from None


def _out_of_memory_cause(error: BaseException | None) -> BaseException | None:
    """The out-of-memory error behind `error`, if any: also one met while compiling, which
    torch.compile wraps in its own error (inductor tries kernels out on real tensors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, torch.OutOfMemoryError) or (
                isinstance(error, RuntimeError) and "can't allocate memory" in str(error)):
            return error
        error = (getattr(error, "inner_exception", None) or error.__cause__
                 or error.__context__)
    return None


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """The dtype `--dtype` names, checked against `device`."""
    dtype = DTYPES[name]
    if device is not None:
        try:
            devices.check_dtype_supported(dtype, device)
        except ValueError as error:
            raise SystemExit(f"error: --dtype: {error}") from None
    return dtype


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")


def positive_ints(text: str) -> list[int]:
    """An argparse type: a comma-separated list of integers >= 1 ("16,128,1024")."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 16,128,1024, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def load_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
               overrides: dict | None = None) -> GPT2:
    """The model of --checkpoint DIR, or of --preset with random weights from --seed (saying
    so on standard error), on `device` in `dtype`, in eval mode."""
    if getattr(args, "checkpoint", None):
        return GPT2.from_pretrained(args.checkpoint, dtype=dtype, device=device)
    print(f"note: no --checkpoint given, so the weights are RANDOM (GPT-2 {args.preset}, seed "
          f"{args.seed})", file=sys.stderr)
    config = GPT2Config.from_preset(args.preset, seed=args.seed, **(overrides or {}))
    return GPT2(config).to(device=device, dtype=dtype).eval()


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    from gpt2_decl.speedups.quantize import SCHEMES

    parser.add_argument("--quantize", choices=SCHEMES,
                        help="weight-only int8 weights for decoding (needs torchao)")


def quantized(model: GPT2, scheme: str | None) -> GPT2:
    """`model` quantized in place with `scheme` (None: as it is), or a one-line error."""
    if scheme is None:
        return model
    from gpt2_decl.speedups.quantize import quantize

    try:
        return quantize(model, scheme)
    except (ValueError, ImportError) as error:
        raise SystemExit(f"error: --quantize: {error}") from None
