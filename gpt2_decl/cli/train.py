"""`gpt2-decl train` and `gpt2-decl eval`: train on text (one process or torchrun), then measure.

    STDLIB=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    gpt2-decl train --data "$STDLIB/email" --out runs/email \\
        --n-layer 4 --n-head 4 --d-model 256 --n-ctx 128 --steps 300
    gpt2-decl eval --checkpoint runs/email --data ...   # the same --data
    torchrun --nproc_per_node=4 -m gpt2_decl train ...  # DDP: one process per GPU (or CPU share)
"""

import argparse
import dataclasses
import os
import sys

import torch

from gpt2_decl.cli.common import explained_out_of_memory, resolve_device
from gpt2_decl.core.config import DTYPES, GPT2Config

INTERRUPTED_EXIT_CODE = 130  # what shells report for a process ended by Ctrl-C


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_train_parser(subparsers)
    add_eval_parser(subparsers)


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    from gpt2_decl.training.options import TrainConfig

    defaults = TrainConfig(data="", out="")
    parser = subparsers.add_parser(
        "train", help="train a GPT-2 on text files (torchrun for several processes)",
        description=(
            "Train a GPT-2 on text, with checkpoints, a held-out loss and a loss-curve plot in "
            "--out. Under `torchrun --nproc_per_node=N -m gpt2_decl train ...` it runs "
            "DistributedDataParallel; the global batch is batch-size x grad-accum x N windows."
        ),
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True,
                      help="a text file, a directory (its .txt/.md/.rst/.py files, recursively) "
                      "or a quoted glob")
    data.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                      help="the last fraction of the tokens, held out for evaluation "
                      "(default: %(default)s)")
    data.add_argument("--cache-dir", default=None,
                      help="where tokenized corpora are kept (default: $GPT2_DECL_CACHE or "
                      "~/.cache/gpt2_decl/tokens)")

    model = parser.add_argument_group("model")
    model.add_argument("--preset", default=None, choices=sorted(GPT2Config.PRESETS),
                       help="GPT-2 size to start from (default: small)")
    for name in ("n_layer", "n_head", "d_model", "n_ctx", "vocab_size"):
        model.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                           help=f"override the preset's {name}")
    model.add_argument("--init-from", default=None,
                       help="start from this checkpoint directory's weights and architecture")

    optimization = parser.add_argument_group("optimization")
    optimization.add_argument("--steps", type=int, default=defaults.steps,
                              help="optimizer steps (default: %(default)s)")
    optimization.add_argument("--batch-size", type=int, default=defaults.batch_size,
                              help="windows per process per micro-step (default: %(default)s)")
    optimization.add_argument("--grad-accum", type=int, default=defaults.grad_accum,
                              help="micro-steps per optimizer step (default: %(default)s)")
    optimization.add_argument("--lr", type=float, default=defaults.lr,
                              help="peak learning rate (default: %(default)s)")
    optimization.add_argument("--min-lr", type=float, default=None,
                              help="learning rate at the end of the cosine (default: lr / 10)")
    optimization.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps,
                              help="steps of linear warm-up (default: %(default)s)")
    optimization.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                              help="AdamW decay of weight matrices, not biases or LayerNorm "
                              "(default: %(default)s)")
    optimization.add_argument("--clip-grad", type=float, default=defaults.clip_grad,
                              help="clip the gradient norm to this; 0: no clipping "
                              "(default: %(default)s)")
    optimization.add_argument("--dtype", default=defaults.dtype, choices=sorted(DTYPES),
                              help="compute dtype: bfloat16 autocasts, weights stay float32 "
                              "(default: %(default)s)")
    optimization.add_argument("--compile", action="store_true",
                              help="torch.compile the model for the training steps")

    run = parser.add_argument_group("run")
    run.add_argument("--out", required=True, help="directory for checkpoints, plot and metrics")
    run.add_argument("--eval-every", type=int, default=defaults.eval_every,
                     help="steps between held-out evaluations (default: %(default)s)")
    run.add_argument("--eval-batches", type=int, default=defaults.eval_batches,
                     help="global batches of held-out windows per evaluation "
                     "(default: %(default)s)")
    run.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                     help="steps between checkpoints, and one at the end "
                     "(default: %(default)s)")
    run.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints,
                     help="how many of the newest checkpoints to keep (default: %(default)s)")
    run.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    run.add_argument("--seed", type=int, default=defaults.seed,
                     help="seed for weights and data (default: %(default)s)")
    run.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    run.add_argument("--typecheck", action="store_true",
                     help="check every annotated shape and dtype at runtime (slower)")
    run.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bar or evaluation lines")
    parser.set_defaults(handler=run_train)


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="loss and perplexity of a checkpoint on text",
        description=(
            "Mean next-token loss and perplexity of a checkpoint over consecutive, non-overlapping "
            "windows of its context length: by default the held-out split that training used."
        ),
    )
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint directory, or a training --out directory (its latest)")
    parser.add_argument("--data", required=True, help="the text, as given to train --data")
    parser.add_argument("--split", default="val", choices=("val", "train", "all"),
                        help="held-out split, training split, or the whole corpus")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="default: the one the checkpoint was trained with")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="windows per forward pass (default: %(default)s)")
    parser.add_argument("--max-batches", type=int, default=None,
                        help="stop after this many batches (default: the whole split)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="compute dtype (bfloat16 autocasts)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    parser.add_argument("--cache-dir", default=None, help="where tokenized corpora are kept")
    parser.set_defaults(handler=run_eval)


def run_train(args: argparse.Namespace) -> int:
    from gpt2_decl.training.loop import NonFiniteLossError, TrainingInterrupted, train
    from gpt2_decl.training.options import TrainConfig

    options = {
        option.name: getattr(args, option.name)
        for option in dataclasses.fields(TrainConfig)
        if hasattr(args, option.name)
    }
    options["device"] = str(resolve_device(args.device))
    options["clip_grad"] = args.clip_grad or None
    data, out = options.pop("data"), options.pop("out")
    what = f"training with --batch-size {args.batch_size} (per process)"
    try:
        with explained_out_of_memory(torch.device(options["device"]), what):
            result = train(data, out, **options)
    except PermissionError as error:
        raise SystemExit(f"error: cannot write to {error.filename}: {error.strerror}") from None
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except TrainingInterrupted as interrupted:
        if not _is_main_process():
            return INTERRUPTED_EXIT_CODE
        print(f"\ninterrupted after step {interrupted.step}; checkpoint {interrupted.checkpoint}; "
              f"continue with the same command and --resume", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    if not _is_main_process():
        return 0
    print(f"trained {result.step} steps; checkpoint: {result.checkpoint}")
    if result.train_loss is not None:
        print(f"final training loss {result.train_loss:.4f}")
    if result.eval_loss is not None:
        print(f"held-out loss {result.eval_loss:.4f}, perplexity {result.eval_perplexity:.2f}")
    if result.tokens_per_s is not None:
        print(f"throughput {result.tokens_per_s:,.0f} tokens/s; "
              f"{result.flops_per_token / 1e6:.1f} MFLOP per token (6N + 12 n_layer n_ctx d_model)")
    if result.mfu is not None:
        peak = result.peak_flops / 1e9
        print(f"model FLOPs utilisation {100 * result.mfu:.1f}% of a {peak:,.0f} GFLOP/s "
              "matmul roofline measured in this run")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from gpt2_decl.training.evaluation import evaluate_checkpoint

    evaluation = evaluate_checkpoint(
        args.checkpoint, args.data, split=args.split, val_fraction=args.val_fraction,
        batch_size=args.batch_size, max_batches=args.max_batches,
        device=resolve_device(args.device), dtype=args.dtype, cache_dir=args.cache_dir,
    )
    print(f"checkpoint {evaluation.checkpoint}")
    print(f"{evaluation.split} split: {evaluation.tokens:,} tokens")
    print(f"loss {evaluation.loss:.4f}")
    print(f"perplexity {evaluation.perplexity:.2f}")
    return 0


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"
