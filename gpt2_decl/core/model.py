"""GPT-2 as a composition of the layers: embed, transformer blocks, unembed."""

import math
import os
from collections.abc import Callable, Mapping

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from gpt2_decl.core import activations, layers
from gpt2_decl.core.activations import ActivationCache, NameSpec, Taps, plain_site
from gpt2_decl.core.config import GPT2Config
from gpt2_decl.core.inputs import check_tokens
from gpt2_decl.core.kv_cache import KVCache
from gpt2_decl.core.typecheck import shape_checked

# The integer dtypes F.embedding indexes with; other integer ids are widened to int64.
INDEX_DTYPES = (torch.int64, torch.int32)
# The two projections that write into the residual stream: initialised smaller.
RESIDUAL_PROJECTIONS = ("attn.proj.weight", "mlp.down.weight")


class LayerNorm(nn.LayerNorm):
    def weights(self) -> layers.LayerNormWeights:
        return layers.LayerNormWeights(self.weight, self.bias)


class Attention(nn.Module):
    """The weights of a block's attention (its maths is in `layers`)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def weights(self) -> layers.AttentionWeights:
        return layers.AttentionWeights(
            self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias
        )


class MLP(nn.Module):
    """The weights of a block's feed-forward network (its maths is in `layers`)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.up = nn.Linear(config.d_model, config.d_mlp)
        self.down = nn.Linear(config.d_mlp, config.d_model)

    def weights(self) -> layers.MLPWeights:
        return layers.MLPWeights(self.up.weight, self.up.bias, self.down.weight, self.down.bias)


class Block(nn.Module):
    """One pre-LayerNorm transformer block: attention, then the MLP, each added to the residual."""

    def __init__(self, config: GPT2Config, index: int):
        super().__init__()
        self.config, self.index = config, index
        self.ln_1 = LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.ln_2 = LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    @shape_checked
    def forward(
        self,
        resid_pre: Float[Tensor, "batch seq d_model"],
        visible: Bool[Tensor, "#batch 1 seq kv_seq"] | None = None,
        cache: KVCache | None = None,
        slots: Int[Tensor, " seq"] | None = None,
        taps: Taps | None = None,
    ) -> Float[Tensor, "batch seq d_model"]:
        """`visible`: which keys each position attends to (None: causal over `resid_pre` itself).
        With a `cache`, the keys are the cached ones, with these tokens' own written at `slots`.
        With `taps`, each named activation passes through its site (captured, patched)."""
        eps, n_head, dropout = self.config.layer_norm_eps, self.config.n_head, self.dropout
        site = plain_site if taps is None else taps.sites(self.index)
        resid_pre = site("resid_pre", resid_pre)
        attn_in = site("attn_in", layers.layer_norm(resid_pre, self.ln_1.weights(), eps))
        q, k, v = layers.qkv_heads(attn_in, self.attn.weights(), n_head)
        q, k, v = site("q", q), site("k", k), site("v", v)
        keys, values = (k, v) if cache is None else cache.update(self.index, slots, k, v)
        if taps is not None and taps.explicit_attention(self.index):
            scores = site("scores", layers.attention_scores(q, keys, visible))
            pattern = site("pattern", layers.attention_pattern(scores, dropout))
            z = site("z", layers.weighted_values(pattern, values))
        else:
            z = site("z", layers.attend(q, keys, values, visible, dropout))
        attn_out = site("attn_out", layers.merge_heads(z, self.attn.weights(), dropout))
        resid_mid = site("resid_mid", resid_pre + attn_out)
        mlp_in = site("mlp_in", layers.layer_norm(resid_mid, self.ln_2.weights(), eps))
        mlp_pre = site("mlp_pre", layers.mlp_up(mlp_in, self.mlp.weights()))
        mlp_post = site("mlp_post", layers.gelu(mlp_pre))
        mlp_out = site("mlp_out", layers.mlp_down(mlp_post, self.mlp.weights(), dropout))
        return site("resid_post", resid_mid + mlp_out)

    @property
    def dropout(self) -> float:
        return self.config.dropout if self.training else 0.0


class GPT2(nn.Module):
    """GPT-2: token + position embeddings, `n_layer` blocks, final LayerNorm, tied output head."""

    def __init__(self, config: GPT2Config | None = None):
        super().__init__()
        self.config = config = config or GPT2Config()
        # Made uninitialised (reset_parameters initialises every weight): torch's own init of
        # an embedding on the meta device would import the compiler, for seconds.
        self.token_embedding = nn.Embedding(
            config.vocab_size, config.d_model,
            _weight=torch.empty(config.vocab_size, config.d_model),
        )
        self.position_embedding = nn.Embedding(
            config.n_ctx, config.d_model, _weight=torch.empty(config.n_ctx, config.d_model)
        )
        self.blocks = nn.ModuleList(Block(config, index) for index in range(config.n_layer))
        self.ln_f = LayerNorm(config.d_model, eps=config.layer_norm_eps)
        # The output head is the token embedding itself (tied): one tensor, two names.
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight
        self.reset_parameters()

    @shape_checked
    def forward(
        self,
        tokens: Int[Tensor, "batch seq"],
        cache: KVCache | None = None,
        *,
        last_only: bool = False,
        check_values: bool = True,
        taps: Taps | None = None,
    ) -> Float[Tensor, "batch seq_out vocab"]:
        """Next-token logits for every position of `tokens` (seq_out = seq), or for the last
        one only with `last_only` (seq_out = 1): all that generating the next token needs, and
        the output head, the largest matrix, then multiplies one position instead of all.

        With a `cache`, `tokens` continue the cached ones: attention reads the earlier keys and
        values from the cache and adds these tokens' own. With `taps`, every named activation
        passes through its site, where it is captured or patched (`run_with_cache`,
        `run_with_patches`).
        check_values: also check what needs the tensors' values (ids inside the vocabulary, room
            in the cache). On an accelerator that waits for the device; loops that feed ids
            already checked (training, generation) pass False.
        """
        if not torch.compiler.is_compiling():
            check_tokens(tokens, self.config, self.device, cache=cache, values=check_values)
        if tokens.dtype not in INDEX_DTYPES:
            tokens = tokens.long()
        seq = tokens.shape[1]
        if cache is None:
            slots, visible = None, None
            positions = torch.arange(seq, device=tokens.device)[None]
        else:
            slots = cache.reserve(seq)
            # One mask for every layer.
            positions, visible = cache.positions(slots), cache.visible(slots)
        site = plain_site if taps is None else taps.site
        resid = self.embed(tokens, positions, site)
        for block in self.blocks:
            resid = block(resid, visible, cache, slots, taps)
        return self.unembed(resid[:, -1:] if last_only else resid, site)

    @shape_checked
    def embed(
        self,
        tokens: Int[Tensor, "batch seq"],
        positions: Int[Tensor, "#batch seq"],
        site: Callable[[str, Tensor], Tensor] = plain_site,
    ) -> Float[Tensor, "batch seq d_model"]:
        embed, pos_embed = layers.embeddings(tokens, positions, self.token_embedding.weight,
                                             self.position_embedding.weight)
        embed = site("embed", embed)
        # Rows at the same positions share one embedding of them, seen as the batch's (a view).
        pos_embed = site("pos_embed", pos_embed.expand_as(embed))
        return layers.maybe_dropout(embed + pos_embed, self.config.dropout if self.training
                                    else 0.0)

    @shape_checked
    def unembed(
        self,
        resid: Float[Tensor, "batch seq d_model"],
        site: Callable[[str, Tensor], Tensor] = plain_site,
    ) -> Float[Tensor, "batch seq vocab"]:
        resid_final = site("resid_final", resid)
        ln_final = site("ln_final", layers.layer_norm(resid_final, self.ln_f.weights(),
                                                      self.config.layer_norm_eps))
        return site("logits", layers.unembed(ln_final, self.lm_head.weight))

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """GPT-2's initialisation, reproducible from `seed` (default: the config's seed).

        Weights ~ N(0, init_std), biases 0, LayerNorm (1, 0); the two projections that write into
        the residual stream are scaled by 1/sqrt(2 n_layer), one per residual add.
        """
        if self.device.type == "meta":
            return
        config = self.config
        generator = torch.Generator(device=self.device).manual_seed(
            config.seed if seed is None else seed
        )
        residual_std = config.init_std / math.sqrt(2 * config.n_layer)
        for name, parameter in self.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                parameter.normal_(0.0, residual_std, generator=generator)
            elif parameter.ndim == 2:
                parameter.normal_(0.0, config.init_std, generator=generator)
            elif name.endswith("weight") and (".ln_" in name or name.startswith("ln_")):
                parameter.fill_(1.0)
            else:
                parameter.zero_()

    # Looking inside: capture and patch the named activations (core.activations).

    def run_with_cache(
        self, tokens: Tensor, names: NameSpec = None, *, patches: Mapping | None = None,
        **options,
    ) -> tuple[Tensor, ActivationCache]:
        """The logits, and the activations `names` names (None: all; a name, a glob such as
        "blocks.*.resid_post", a list, or a predicate), from one forward pass.

        patches: {name: patch} put in on the way (see `run_with_patches`).
        options: attention_mask (left-padded rows, each given the activations it has alone),
            cache (continue a KVCache), positions (keep only these positions of each capture),
            dtype and device (of the captures), gradients (captures that `cache.grad` reads
            after a backward pass through the logits).
        """
        return activations.run(self, self, tokens, names, patches, **options)

    def run_with_patches(self, tokens: Tensor, patches: Mapping, **options) -> Tensor:
        """The logits of a forward pass with activations patched, {name: patch}: a tensor of
        the activation's shape (it replaces it), a function of the activation, or a
        `gpt2_decl.Patch` (a value put in at some positions and heads only)."""
        return activations.run(self, self, tokens, (), patches, **options)[0]

    # Convenience forwards to the modules that load, save and generate (none imports this one).

    def generate(self, tokens: Tensor, max_new_tokens: int, **options) -> Tensor:
        """`tokens` continued by up to `max_new_tokens` tokens: see `generation.generate`."""
        from gpt2_decl.text.generation import generate

        return generate(self, tokens, max_new_tokens, **options)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **options) -> "GPT2":
        """A GPT-2 with released (Hugging Face layout) or saved weights, in eval mode: see
        `storage.huggingface.load_pretrained` (options: config, dtype, device)."""
        from gpt2_decl.storage.huggingface import load_pretrained

        return load_pretrained(path, cls, **options)

    def save_gguf(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
        """Write the model with GPT-2's tokenizer as a GGUF file for llama.cpp: see
        `storage.gguf.save_gguf`."""
        from gpt2_decl.storage.gguf import save_gguf

        save_gguf(self, path, dtype=dtype)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `config.json` + `model.safetensors` (Hugging Face names and layout) as one
        atomic change of `directory`: see `storage.huggingface.save_pretrained`."""
        from gpt2_decl.storage.huggingface import save_pretrained

        save_pretrained(self, directory)

