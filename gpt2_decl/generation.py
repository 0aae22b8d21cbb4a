"""Generation: sampling the next token, and the loop that continues a batch of token sequences.

With the cache (the default) the prompt is run once, eagerly (prefill), and every later token is
one step over a single token that reads the other tokens' keys and values from a `KVCache`. That
step has the same shapes for every token, so compiled it is compiled once.
"""

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from gpt2_decl import huge_pages, layers
from gpt2_decl.kv_cache import KVCache
from gpt2_decl.typecheck import shape_checked

if TYPE_CHECKING:
    from gpt2_decl.model import GPT2


@shape_checked
def sample(
    logits: Float[Tensor, "batch vocab"],
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Int[Tensor, " batch"]:
    """One token per row: the most likely (greedy), or drawn from the softmax of
    `logits / temperature` restricted to the `top_k` most likely tokens and to the smallest set of
    most likely tokens whose probability reaches `top_p` (the nucleus)."""
    if greedy:
        # The first most likely token, as argmax gives, but argmax over bfloat16 on a CPU takes
        # 4x as long (180 against 45 us for GPT-2's 50,257 logits).
        return logits.max(-1).indices
    logits = logits.float() / temperature
    if top_k is not None:
        kth_largest = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # A token goes when the tokens ranked above it already reach top_p; the first never does.
        outside = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def check_generate_arguments(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    greedy: bool,
) -> None:
    """Raise TypeError/ValueError naming the argument when the sampling settings make no sense."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (or use greedy=True), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def stream(
    model: "GPT2",
    tokens: Int[Tensor, "batch seq"],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    compile: bool | str | Callable = False,
    use_cache: bool = True,
) -> Iterator[Int[Tensor, " batch"]]:
    """Yield the next token of every row, one column at a time, as soon as each is sampled.

    temperature, top_k, top_p: sampling from the softmax of logits / temperature, restricted to
        the top_k most likely tokens, then to the smallest set of most likely tokens whose
        probability reaches top_p. greedy: always the most likely token instead.
    eos_id: a row stops at this token; its later positions are filled with it, and generation
        ends early once every row has stopped (so new may be less than max_new_tokens).
    generator: the torch.Generator to sample with; a seeded one makes the output reproducible.
    compile: compile the model for the decode steps (True: inductor; or a torch.compile backend).
    use_cache: keep keys and values in a `KVCache` (fast) rather than rerun the whole context.

    The model runs in eval mode, without gradients, until the iterator is exhausted or closed;
    then its train/eval mode is restored. Compiled by inductor with the cache on a Linux CPU,
    the first generation moves the model's weights into transparent huge pages (see
    `huge_pages`): same values and Parameter objects, read faster.
    """
    check_generate_arguments(max_new_tokens, temperature, top_k, top_p, greedy)
    model.check_tokens(tokens)
    batch, seq = tokens.shape
    if seq + max_new_tokens > model.config.n_ctx:
        raise ValueError(
            f"a prompt of {seq} tokens plus max_new_tokens={max_new_tokens} is "
            f"{seq + max_new_tokens} tokens, more than the context of {model.config.n_ctx} "
            "(n_ctx); shorten one of them"
        )
    vocab_size = model.config.vocab_size
    if eos_id is not None and not (_is_int(eos_id) and 0 <= eos_id < vocab_size):
        raise ValueError(f"eos_id must be a token id in [0, {vocab_size}) or None, got {eos_id!r}")
    sampling = dict(
        temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, generator=generator
    )
    return _decode(model, tokens, max_new_tokens, eos_id, compile, use_cache, sampling)


@torch.no_grad()
def _decode(
    model: "GPT2",
    tokens: Tensor,
    max_new_tokens: int,
    eos_id: int | None,
    compile: bool | str | Callable,
    use_cache: bool,
    sampling: dict,
) -> Iterator[Tensor]:
    # torch.no_grad() on a generator function applies to its own steps, not to the caller's code.
    if max_new_tokens == 0:
        return
    was_training = model.training
    model.eval()
    try:
        batch, seq = tokens.shape
        step = _step_function(model, compile, use_cache)
        cache = None
        if use_cache:
            max_len = seq + max_new_tokens
            cache = KVCache(model.config, batch, max_len, dtype=model.dtype, device=model.device)
            cache.positions = torch.arange(seq, device=tokens.device)
            logits = model(tokens, cache, last_only=True)[:, -1]
            cache.positions = torch.tensor([seq], device=tokens.device)
        else:
            context = tokens
            logits = step(context, last_only=True)[:, -1]
        finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
        for index in range(max_new_tokens):
            next_token = sample(logits, **sampling)
            if eos_id is not None:
                next_token = next_token.masked_fill(finished, eos_id)
                finished |= next_token == eos_id
            yield next_token
            if index == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                return
            if cache is not None:
                logits = step(next_token[:, None], cache)[:, -1]
                cache.positions += 1
            else:
                context = torch.cat([context, next_token[:, None]], dim=1)
                logits = step(context, last_only=True)[:, -1]
    finally:
        model.train(was_training)


def _step_function(model: "GPT2", compile: bool | str | Callable, use_cache: bool) -> Callable:
    """What computes the logits of each step: the model, or the model compiled whole.

    `compile` is False, True (inductor) or any torch.compile backend. Compiled by inductor for a
    CPU, the one-token step's matmuls become single passes over the weights (see
    `layers.linear`), which it reads faster from huge pages: the weights move there (once).
    """
    if compile is False:
        return model
    from gpt2_decl.compiling import compile as compile_model

    backend = "inductor" if compile is True else compile
    if use_cache:
        options = None
        if backend == "inductor" and model.device.type == "cpu":
            options = layers.ONE_ROW_INDUCTOR_OPTIONS
            huge_pages.move_parameters(model)
        # The cache was checked when it was made and the tokens are sampled: call the graph direct.
        return compile_model(model, backend=backend, options=options).compiled
    # The context grows by one token per step: dynamic after the first change.
    return compile_model(model, backend=backend)


def generate(
    model: "GPT2", tokens: Int[Tensor, "batch seq"], max_new_tokens: int, **options: Any
) -> Int[Tensor, "batch seq_out"]:
    """`tokens` continued by up to `max_new_tokens` tokens: [batch, seq + new].

    `options` are `stream`'s (temperature, top_k, top_p, greedy, eos_id, generator, compile,
    use_cache). The context never slides: a ValueError if seq + max_new_tokens exceeds n_ctx.
    """
    new_tokens = list(stream(model, tokens, max_new_tokens, **options))
    return torch.cat([tokens, *(token[:, None] for token in new_tokens)], dim=1)
