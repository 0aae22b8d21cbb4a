"""One forward pass of GPT-2: the first thing to run.

python examples/forward.py                      # GPT-2 small, seeded random weights
python examples/forward.py --typecheck          # check every annotated shape at runtime
python examples/forward.py --compile            # torch.compile the whole model first
python examples/forward.py --prompt "The capital of France is"
python examples/forward.py --shapes             # every stage's shape first, from the annotations
"""

import argparse
import time

import torch

import gpt2_decl
from gpt2_decl.cli.common import add_model_arguments, resolve_device, resolve_dtype

TOP_K_SHOWN = 5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=2, help="sequences in the batch")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model (fullgraph)"
    )
    parser.add_argument("--prompt", default=None, help="run on this text instead of random ids")
    parser.add_argument("--checkpoint", default=None, help="a Hugging Face-layout GPT-2 directory")
    parser.add_argument("--shapes", action="store_true",
                        help="print every stage's shape (checked on the meta device) first")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    gpt2_decl.set_typechecked(args.typecheck or gpt2_decl.is_typechecked())
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    ids = None
    if args.prompt is not None:  # refused before any weights are made
        tokenizer = gpt2_decl.GPT2Tokenizer()
        ids = tokenizer.encode(args.prompt)
        if not ids:
            raise SystemExit("error: --prompt is empty; give at least one character of text")

    if args.checkpoint:
        model = gpt2_decl.GPT2.from_pretrained(args.checkpoint, dtype=dtype, device=device)
        weights = f"from {args.checkpoint}"
    else:
        config = gpt2_decl.GPT2Config.from_preset(args.preset, seed=args.seed)
        model = gpt2_decl.GPT2(config).to(device=device, dtype=dtype)
        weights = f"random (seed {args.seed})"
    model.eval()
    config = model.config
    counts = gpt2_decl.count_parameters(model)

    if ids is not None:
        tokens = torch.tensor([ids], device=device)
    else:
        generator = torch.Generator().manual_seed(args.seed)
        tokens = torch.randint(config.vocab_size, (args.batch, args.seq), generator=generator).to(
            device
        )

    mode = "on" if gpt2_decl.is_typechecked() else "off"
    print(f"device      {device} ({dtype}), typechecked mode {mode}")
    print(f"config      {config}")
    print(f"weights     {weights}")
    print(
        f"parameters  {counts.tied:,} (tied); {counts.untied:,} counted untied, as torchinfo does"
    )
    print(f"input       tokens {tuple(tokens.shape)}")
    if args.shapes:
        print()
        print(gpt2_decl.shape_table(model, *tokens.shape))
        print()

    run = model
    with torch.no_grad():
        if args.compile:
            run = gpt2_decl.compile(model)
            start = time.perf_counter()
            run(tokens)
            print(f"compile     {time.perf_counter() - start:.1f} s (first call)")
        start = time.perf_counter()
        logits = run(tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start

    last = logits[:, -1].float()
    print(f"logits      {tuple(logits.shape)} {logits.dtype}")
    print(f"next token  {last.argmax(-1).tolist()} (argmax at the last position, per sequence)")
    if args.prompt is not None:
        probabilities = last[0].softmax(-1)
        top = probabilities.topk(TOP_K_SHOWN)
        if not args.checkpoint:
            print("note: the weights are random (no --checkpoint), so these are meaningless")
        print(f"after {args.prompt!r}, most likely next tokens:")
        for probability, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            print(f"  {tokenizer.decode([token])!r:>20}  p={probability:.4f}")
    how = "compiled" if args.compile else "eager"
    tokens_per_s = tokens.numel() / elapsed
    print(f"time        {elapsed * 1e3:.1f} ms ({how} forward, {tokens_per_s:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
