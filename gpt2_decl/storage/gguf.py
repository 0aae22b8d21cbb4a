"""GPT-2 as a GGUF file, the format llama.cpp and the tools built on it read.

The file holds the architecture ("gpt2"), the weights under llama.cpp's names (in torch's
(out, in) layout, which the format stores as llama.cpp wants; the fused QKV matrix as it is;
no output matrix, which llama.cpp then ties to the token embedding, as GPT-2 does) and GPT-2's
tokenizer (its byte-level BPE vocabulary and merges). In a bfloat16 file the matrices are
bfloat16 and the position embedding, norms and biases stay float32, as llama.cpp's own converter
writes them. Needs the `gguf` package (`pip install gguf`).
"""

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from gpt2_decl.core.config import END_OF_TEXT_ID, GPT2_VOCAB_SIZE
from gpt2_decl.storage.atomic import atomic_write
from gpt2_decl.storage.huggingface import refuse_quantized
from gpt2_decl.text.tokenizer import released_vocabulary

# Our module names -> llama.cpp's (per block, and at the top).
BLOCK_TENSORS = {"ln_1": "attn_norm", "attn.qkv": "attn_qkv", "attn.proj": "attn_output",
                 "ln_2": "ffn_norm", "mlp.up": "ffn_up", "mlp.down": "ffn_down"}
TOP_TENSORS = {"token_embedding": "token_embd", "position_embedding": "position_embd",
               "ln_f": "output_norm"}
# What llama.cpp's tokenizer loader expects of GPT-2: its pre-tokenizer, and the token types.
PRE_TOKENIZER = "gpt-2"
NORMAL_TOKEN, CONTROL_TOKEN = 1, 3


def gguf_name(name: str) -> str:
    """llama.cpp's name for our parameter `name`: "blocks.3.mlp.up.weight" is
    "blk.3.ffn_up.weight"."""
    module, _, parameter = name.rpartition(".")
    if module.startswith("blocks."):
        _, block, part = module.split(".", 2)
        return f"blk.{block}.{BLOCK_TENSORS[part]}.{parameter}"
    return f"{TOP_TENSORS[module]}.{parameter}"


def save_gguf(
    model: nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> Path:
    """Write `model` with GPT-2's tokenizer as a GGUF file at `path` (atomically), its matrices in
    `dtype` (float32 or bfloat16; default: the model's). Returns the path."""
    try:
        import gguf
    except ImportError:
        raise ImportError("writing GGUF needs the gguf package: pip install gguf") from None
    refuse_quantized(model)
    config, dtype = model.config, dtype or model.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"GGUF files are written in float32 or bfloat16, not {dtype}")
    if config.vocab_size != GPT2_VOCAB_SIZE:
        raise ValueError(
            f"a GGUF file carries GPT-2's tokenizer, whose {GPT2_VOCAB_SIZE} tokens a model of "
            f"vocab_size={config.vocab_size} does not have"
        )
    tokens, merges = released_vocabulary()
    path = Path(path)
    with atomic_write(path) as tmp, contextlib.closing(gguf.GGUFWriter(tmp, "gpt2")) as writer:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(path.stem)
        writer.add_block_count(config.n_layer)
        writer.add_context_length(config.n_ctx)
        writer.add_embedding_length(config.d_model)
        writer.add_feed_forward_length(config.d_mlp)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_eps)
        bf16 = dtype == torch.bfloat16
        writer.add_file_type(
            gguf.LlamaFileType.MOSTLY_BF16 if bf16 else gguf.LlamaFileType.ALL_F32)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(PRE_TOKENIZER)
        writer.add_token_list(tokens)
        writer.add_token_types([CONTROL_TOKEN if index == END_OF_TEXT_ID else NORMAL_TOKEN
                                for index in range(len(tokens))])
        writer.add_token_merges(merges)
        writer.add_bos_token_id(END_OF_TEXT_ID)
        writer.add_eos_token_id(END_OF_TEXT_ID)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        for name, parameter in model.named_parameters():  # the tied head is the embedding
            tensor = parameter.detach().to("cpu", torch.float32).contiguous()
            matrix = tensor.ndim == 2 and name != "position_embedding.weight"
            if bf16 and matrix:
                data = tensor.to(torch.bfloat16).view(torch.int16).numpy()
                writer.add_tensor(gguf_name(name), data, raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                writer.add_tensor(gguf_name(name), tensor.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return path
