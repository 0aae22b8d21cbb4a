"""Generation: sampling the next token, and the loop that continues a batch of token sequences.

With the cache (the default) the prompt runs once, eagerly (prefill), and every later token is
one step over a single token that reads the other tokens' keys and values from a `KVCache`. That
step has the same shapes for every token, so compiled it is compiled once. A speed-up plan
(`gpt2_decl.speedups.tune`) compiles the step with its speed-ups and runs the prompt with them;
generation calls the plan's methods and imports none of the speed-up code itself. The loop
never reads a tensor's value on the host except to stop early at `eos_id` (every token on a
CPU, every `EOS_CHECK_EVERY` tokens on an accelerator), so a GPU runs the steps back to back.
"""

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from gpt2_decl.core.compiling import SpeedPlan
from gpt2_decl.core.compiling import compile as compile_model
from gpt2_decl.core.inputs import check_tokens, left_padding_start
from gpt2_decl.core.kv_cache import KVCache
from gpt2_decl.core.typecheck import shape_checked

# Below this temperature, sampling is greedy: softmax(logits / t) is a point mass there to
# float32's precision, and smaller t would overflow the division.
GREEDY_BELOW_TEMPERATURE = 1e-5
# On an accelerator, how many tokens pass between two checks that every row has stopped.
EOS_CHECK_EVERY = 16


@shape_checked
def sample(
    logits: Float[Tensor, "batch vocab"],
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Int[Tensor, " batch"]:
    """One token per row: the most likely (greedy), or drawn from the softmax of
    `logits / temperature` restricted to the `top_k` most likely tokens and to the smallest set of
    most likely tokens whose probability reaches `top_p` (the nucleus). With one generator per
    row, each row draws from its own, as it would alone."""
    if isinstance(generator, Sequence):
        options = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
        return torch.cat([sample(row[None], generator=row_generator, **options)
                          for row, row_generator in zip(logits, generator, strict=True)])
    if greedy or temperature < GREEDY_BELOW_TEMPERATURE:
        # The first most likely token, as argmax gives; argmax over bfloat16 is slower on a CPU.
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
    """Raise ValueError naming the argument when the sampling settings make no sense."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not greedy and not (isinstance(temperature, int | float) and temperature > 0):
        raise ValueError(f"temperature must be > 0 (or use greedy=True), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def stream(
    model: nn.Module,
    tokens: Int[Tensor, "batch seq"] | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    attention_mask: Int[Tensor, "batch seq"] | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    eos_id: int | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    compile: bool | str | Callable = False,
    plan: SpeedPlan | None = None,
    use_cache: bool = True,
) -> Iterator[Int[Tensor, " batch"]]:
    """Yield the next token of every row, one column at a time, as soon as each is sampled.

    tokens: a [batch, seq] tensor of prompts of one length, or a list of prompts (lists of ids)
        of any lengths, which are padded on the left; or a padded tensor with its
        `attention_mask` (1 for a token, 0 for padding, which must come first in its row). Each
        row then decodes as its prompt would alone: its positions count from its first token,
        and it never attends to padding.

    temperature, top_k, top_p: sampling from the softmax of logits / temperature, restricted to
        the top_k most likely tokens, then to the smallest set of most likely tokens whose
        probability reaches top_p. greedy (or a temperature below 1e-5): the most likely token.
    eos_id: a row stops at this token; its later positions are filled with it, and generation
        ends once every row has stopped (on an accelerator, up to EOS_CHECK_EVERY - 1 columns of
        eos_id may come first; `generate` drops them).
    generator: the torch.Generator to sample with (a seeded one makes the output reproducible),
        or one per row, so that each row draws what it would draw alone.
    compile: compile the decode step: True (inductor, the same way every run; on CUDA with
        CUDA graphs), or a torch.compile backend.
    plan: a speed-up plan for this model and batch (`gpt2_decl.speedups.tune`, or one loaded
        from JSON): the step compiled, and the prompt run, with its speed-ups. Nothing is timed.
    use_cache: keep keys and values in a `KVCache` (fast) rather than rerun the whole context.

    The model runs in eval mode, without gradients, until the iterator is exhausted or closed;
    then its train/eval mode is restored. Its parameters are never moved or copied.
    """
    check_generate_arguments(max_new_tokens, temperature, top_k, top_p, greedy)
    config = model.config
    tokens, start = prompt_batch(tokens, attention_mask, config.vocab_size, model.device)
    check_tokens(tokens, config, model.device)
    batch, seq = tokens.shape
    if start is not None and not use_cache:
        raise ValueError("prompts of different lengths are decoded with the cache: drop "
                         "use_cache=False")
    if isinstance(generator, Sequence) and len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for {batch} rows: give one per row")
    if seq + max_new_tokens > config.n_ctx:
        raise ValueError(
            f"a prompt of {seq} tokens plus max_new_tokens={max_new_tokens} is "
            f"{seq + max_new_tokens} tokens, more than the context of {config.n_ctx} "
            "(n_ctx); shorten one of them"
        )
    if eos_id is not None and not (_is_int(eos_id) and 0 <= eos_id < config.vocab_size):
        raise ValueError(
            f"eos_id must be a token id in [0, {config.vocab_size}) or None, got {eos_id!r}"
        )
    if plan is not None:
        if compile not in (False, True) or not use_cache:
            raise ValueError("a plan compiles the cached decode step its own way: drop compile="
                             f"{compile!r}" if use_cache else "a plan is for decoding with the "
                             "cache: drop use_cache=False")
        plan.check(model, batch, decoding=True)
    sampling = dict(
        temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, generator=generator
    )
    return _decode(model, tokens, start, max_new_tokens, eos_id, compile, plan, use_cache,
                   sampling)


def prompt_batch(
    tokens: Tensor | Sequence[Sequence[int]],
    attention_mask: Tensor | None,
    vocab_size: int,
    device: torch.device,
) -> tuple[Tensor, Tensor | None]:
    """The prompts as one [batch, seq] tensor, and each row's first token's column when they
    are padded on the left (None when none is)."""
    if isinstance(tokens, Tensor):
        if attention_mask is None:
            return tokens, None
        return tokens, left_padding_start(attention_mask, tokens)
    if attention_mask is not None:
        raise ValueError("attention_mask goes with a padded tensor of prompts; a list of "
                         "prompts of different lengths needs none")
    if isinstance(tokens, str | bytes) or not isinstance(tokens, Sequence) or not tokens:
        raise TypeError("expected a [batch, seq] tensor or a non-empty list of prompts (lists of "
                        f"token ids), got {type(tokens).__name__}")
    rows = []
    for index, prompt in enumerate(tokens):
        if isinstance(prompt, str | bytes) or not isinstance(prompt, Sequence | Tensor):
            raise TypeError(f"prompt {index} is a {type(prompt).__name__}, not a list of ids")
        ids = [int(token) for token in prompt]
        if not ids:
            raise ValueError(f"prompt {index} is empty; every prompt needs at least one token")
        bad = [token for token in ids if not 0 <= token < vocab_size]
        if bad:
            raise ValueError(f"prompt {index} holds token id {bad[0]}, outside the vocabulary "
                             f"[0, {vocab_size})")
        rows.append(ids)
    longest = max(len(ids) for ids in rows)
    padded = torch.tensor([[0] * (longest - len(ids)) + ids for ids in rows], device=device)
    if all(len(ids) == longest for ids in rows):
        return padded, None
    return padded, torch.tensor([longest - len(ids) for ids in rows], device=device)


@torch.no_grad()
def _decode(
    model: nn.Module,
    tokens: Tensor,
    start: Tensor | None,
    max_new_tokens: int,
    eos_id: int | None,
    compile: bool | str | Callable,
    plan: SpeedPlan | None,
    use_cache: bool,
    sampling: dict,
) -> Iterator[Tensor]:
    # torch.no_grad() on a generator function applies to its own steps, not to the caller's code.
    if max_new_tokens == 0:
        return
    was_training, cache = model.training, None
    model.eval()
    try:
        batch, seq = tokens.shape
        step = decode_step(model, compile, use_cache, plan)
        cache = _take_cache(model, batch, seq + max_new_tokens, start) if use_cache else None
        if use_cache:
            with plan.prefill(model) if plan is not None else contextlib.nullcontext():
                logits = model(tokens, cache, last_only=True, check_values=False)[:, -1]
        else:
            context = tokens
            logits = step(context, last_only=True, check_values=False)[:, -1]
        finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
        check_every = 1 if tokens.device.type == "cpu" else EOS_CHECK_EVERY
        for index in range(max_new_tokens):
            next_token = sample(logits, **sampling)
            if eos_id is not None:
                next_token = next_token.masked_fill(finished, eos_id)
                finished |= next_token == eos_id
            yield next_token
            if index == max_new_tokens - 1:
                return
            if eos_id is not None and (index + 1) % check_every == 0 and bool(finished.all()):
                return
            if use_cache:
                logits = step(next_token[:, None], cache, check_values=False)[:, -1]
            else:
                context = torch.cat([context, next_token[:, None]], dim=1)
                logits = step(context, last_only=True, check_values=False)[:, -1]
    finally:
        model.train(was_training)
        if cache is not None:
            _spare_caches[model] = cache


def decode_step(model: nn.Module, compile: bool | str | Callable, use_cache: bool,
                plan: SpeedPlan | None = None) -> Callable:
    """What computes each step's logits: the model itself, or the model compiled whole.

    compile=True compiles with inductor; the one-token cached step on CUDA with CUDA graphs
    (one launch per token). Without the cache, or with another backend, it is a plain compile.
    A plan compiles the step with its speed-ups. Compiled, the step is checked as
    `gpt2_decl.compile` checks in typechecked mode.
    """
    if plan is not None:
        return plan.compile_decode_step(model)
    if compile is False:
        return model
    if compile is True and use_cache and model.device.type == "cuda":
        return compile_model(model, mode="reduce-overhead")
    # Without the cache the context grows a token per step: dynamic after one change.
    return compile_model(model, backend="inductor" if compile is True else compile)


# The cache of each model's last generation, kept for the next one of the same sizes (a cache
# holds no reference to its model): a step captured as a CUDA graph then finds its buffers at
# the same addresses, and replays instead of capturing again.
_spare_caches: "weakref.WeakKeyDictionary[nn.Module, KVCache]" = weakref.WeakKeyDictionary()


def _take_cache(model: nn.Module, batch: int, max_len: int, start: Tensor | None) -> KVCache:
    """An empty cache for a generation: the model's spare one if it fits, else a new one."""
    cache = _spare_caches.pop(model, None)
    fits = cache is not None and (cache.batch, cache.max_len, cache.keys[0].dtype,
                                  cache.device) == (batch, max_len, model.dtype, model.device)
    if not fits:
        return KVCache(model.config, batch, max_len, dtype=model.dtype, device=model.device,
                       start=start)
    cache.length.zero_()
    if start is None:
        cache.start.zero_()
    else:
        cache.start.copy_(start)
    return cache


def generate(
    model: nn.Module,
    tokens: Int[Tensor, "batch seq"] | Sequence[Sequence[int]],
    max_new_tokens: int,
    **options: Any,
) -> Int[Tensor, "batch seq_out"] | list[list[int]]:
    """The prompts continued by up to `max_new_tokens` tokens: for a tensor, [batch, seq + new]
    (padding kept); for a list of prompts, a list of each prompt and its continuation, which
    ends with its eos_id if it met it.

    `options` are `stream`'s (attention_mask, temperature, top_k, top_p, greedy, eos_id,
    generator, compile, plan, use_cache). The context never slides: a ValueError if the longest
    prompt plus max_new_tokens exceeds n_ctx.
    """
    eos_id = options.get("eos_id")
    columns = [token[:, None] for token in stream(model, tokens, max_new_tokens, **options)]
    new = torch.cat(columns, dim=1) if columns else torch.zeros(0, 0, dtype=torch.long)
    if eos_id is not None and columns:
        new = new[:, : _columns_until_all_stopped(new, eos_id)]
    if isinstance(tokens, Tensor):
        return torch.cat([tokens, new.to(tokens.device)], dim=1) if columns else tokens
    continuations = new.tolist() if columns else [[] for _ in tokens]
    return [[int(token) for token in prompt] + _until_eos(continuation, eos_id)
            for prompt, continuation in zip(tokens, continuations, strict=True)]


def _until_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def _columns_until_all_stopped(new: Tensor, eos_id: int) -> int:
    """How many of the new columns to keep: up to the one where the last row to stop stopped,
    or all of them while a row runs on."""
    is_eos = new == eos_id
    if not bool(is_eos.any(-1).all()):
        return new.shape[1]
    return int(is_eos.int().argmax(-1).max()) + 1
