"""GPT-2 checkpoints in the Hugging Face layout: loading them with checks, and saving them.

A checkpoint directory holds `config.json` and the weights (`model.safetensors`, or
`pytorch_model.bin`, or either split into shards listed by an `.index.json`). Hugging Face names
and lays out the weights its own way; one table below (`TOP_LEVEL_MODULES`, `BLOCK_MODULES`)
maps its names to ours and says which matrices it stores transposed. Loading also accepts our
own names (a `GPT2.state_dict()`), with the prefixes that `torch.compile` and
DistributedDataParallel add.
"""

import json
import os
import pickle
import warnings
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from gpt2_decl.core.config import END_OF_TEXT_ID, GPT2Config
from gpt2_decl.core.devices import resolve_device
from gpt2_decl.core.tensors import has_subclass_weights
from gpt2_decl.storage.atomic import atomic_directory, carry_over, recover_directory

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
PYTORCH_FILE = "pytorch_model.bin"
INDEX_SUFFIX = ".index.json"
# Looked for in this order. An index file maps every key to the shard that holds it.
WEIGHT_FILES = (
    SAFETENSORS_FILE, SAFETENSORS_FILE + INDEX_SUFFIX, PYTORCH_FILE, PYTORCH_FILE + INDEX_SUFFIX,
)

# Our module name -> (Hugging Face's module name, whether HF stores its weight transposed).
# HF keeps the four projections in a "Conv1D" (in, out) layout; ours are torch's (out, in).
TOP_LEVEL_MODULES = {
    "token_embedding": ("wte", False),
    "position_embedding": ("wpe", False),
    "ln_f": ("ln_f", False),
}
BLOCK_MODULES = {
    "ln_1": ("ln_1", False),
    "attn.qkv": ("attn.c_attn", True),
    "attn.proj": ("attn.c_proj", True),
    "ln_2": ("ln_2", False),
    "mlp.up": ("mlp.c_fc", True),
    "mlp.down": ("mlp.c_proj", True),
}
# What earlier versions of gpt2_decl called a block's modules, so their state dicts still load.
EARLIER_BLOCK_MODULES = {"qkv": "attn.qkv", "attn_out": "attn.proj", "mlp_in": "mlp.up",
                         "mlp_out": "mlp.down"}
OUR_BLOCKS, HF_BLOCKS = "blocks", "h"
HF_PREFIX = "transformer."
# Buffers (the causal mask and its fill value) that older HF files keep in every block.
HF_BLOCK_BUFFERS = ("attn.bias", "attn.masked_bias")
# torch.compile puts "_orig_mod." before the names of the module it wraps (anywhere, when a
# submodule was compiled); DistributedDataParallel puts "module." before all of them.
COMPILE_PREFIX, DDP_PREFIX = "_orig_mod.", "module."
EMBEDDING, HEAD = "token_embedding.weight", "lm_head.weight"

# HF config options, with the one value gpt2_decl implements: refused when a file says otherwise,
# and written as they are on saving.
FIXED_OPTIONS = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
# Both are 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's activation (F.gelu "tanh").
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
HF_ARCHITECTURE, HF_MODEL_TYPE = "GPT2LMHeadModel", "gpt2"
# The dropout rates HF keeps apart; gpt2_decl has one rate for all three. HF's default is 0.1.
HF_DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
HF_DEFAULT_DROPOUT = 0.1
# At most this many keys are listed per kind of problem in an error message.
MAX_LISTED = 20
# The safetensors metadata entry where saving records each tensor's CRC-32 (of its bytes), which
# loading checks: corruption that keeps a file's length is caught, not loaded as wrong weights.
CHECKSUM_KEY = "gpt2_decl.crc32"
# A training run's directory points at its newest checkpoint through this link.
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded: unreadable, inconsistent, or of an unsupported kind."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path, or a file a checkpoint directory should hold, does not exist."""


def hf_name(name: str) -> tuple[str, bool]:
    """Hugging Face's name (without "transformer.") for our parameter `name`, and whether HF
    stores it transposed."""
    *module_path, parameter = name.split(".")
    if module_path[0] == OUR_BLOCKS:
        _, block, *module = module_path
        hf_module, conv1d = BLOCK_MODULES[".".join(module)]
        hf_module = f"{HF_BLOCKS}.{block}.{hf_module}"
    else:
        hf_module, conv1d = TOP_LEVEL_MODULES[".".join(module_path)]
    return f"{hf_module}.{parameter}", conv1d and parameter == "weight"


def load_pretrained(
    path: str | os.PathLike,
    model_class: type[nn.Module],
    *,
    config: GPT2Config | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """A `model_class` (GPT2) with the weights at `path`, in eval mode.

    path: a directory holding `config.json` and `model.safetensors` or `pytorch_model.bin` (or
        shards of either with their `.index.json`); a training run's directory (its latest
        checkpoint); or one weights file, with `config`.
    config: the architecture; overrides the directory's `config.json`.
    dtype: the parameters' dtype (default: the checkpoint's).
    device: where the weights are loaded, directly (default: cpu).
    Raises `CheckpointError` (a ValueError) naming what is missing, unexpected, misshapen,
    corrupt or unsupported.
    """
    if config is not None and not isinstance(config, GPT2Config):
        raise TypeError(f"config must be a GPT2Config, got {type(config).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}")
    device = resolve_device("cpu" if device is None else device)
    path = find_checkpoint(path)
    if path.is_dir():
        config = config or read_config(path / CONFIG_FILE)
        files = weight_files(path)
    elif config is None:
        raise CheckpointError(
            f"{path} is a single weights file, which does not say the architecture: pass "
            f"config=GPT2Config(...), or give the directory holding it and its {CONFIG_FILE}"
        )
    else:
        files = [path]

    tensors: dict[str, Tensor] = {}
    for file in files:
        tensors.update(read_tensors(file, device))
    with torch.device("meta"):
        model = model_class(config)
    state = to_our_names(tensors, model, source=path)
    dtype = dtype or state[EMBEDDING].dtype
    state = {name: tensor.to(dtype).contiguous() for name, tensor in state.items()}
    model.load_state_dict({**state, HEAD: state[EMBEDDING]}, assign=True)
    # Assigning gives every name its own Parameter: tie the output head to the embedding again.
    model.lm_head.weight = model.token_embedding.weight
    return model.eval()


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint `path` names: itself, or a training run directory's latest checkpoint.

    Raises CheckpointNotFoundError saying what is there instead (a hub name such as "gpt2" is
    not downloaded: it must be a local copy).
    """
    path = Path(path)
    recover_directory(path)
    if not path.exists():
        hint = ""
        if not path.is_absolute() and len(path.parts) <= 2 and not path.suffix:
            hint = (
                f"; gpt2_decl downloads nothing: if {str(path)!r} is a Hugging Face hub name, "
                "download that model's files (config.json and model.safetensors) to a directory "
                "and give its path"
            )
        raise CheckpointNotFoundError(f"checkpoint not found: {path} does not exist{hint}")
    if not path.is_dir() or (path / CONFIG_FILE).is_file():
        return path
    latest = path / LATEST
    if latest.is_symlink():
        target = latest.resolve()
        if not (target / CONFIG_FILE).is_file():
            raise CheckpointNotFoundError(
                f"{path} is a training run whose {LATEST} link points to {target}, which holds "
                "no checkpoint (deleted?)"
            )
        return target
    raise CheckpointNotFoundError(
        f"{path} is neither a checkpoint directory (no {CONFIG_FILE}) nor a training run "
        f"directory (no {LATEST} checkpoint)"
    )


def to_our_names(
    tensors: Mapping[str, Tensor], model: nn.Module, source: Path
) -> dict[str, Tensor]:
    """`tensors` renamed to `model`'s parameter names (views, transposed where HF's layout differs).

    Raises CheckpointError listing every missing, unexpected and misshapen key at once, or when
    the checkpoint's output head is not the token embedding.
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if name != HEAD}
    from_hf = {}
    for name in expected:
        hf, transposed = hf_name(name)
        from_hf[hf] = (name, transposed)
    ignored = {
        f"{HF_BLOCKS}.{block}.{buffer}"
        for block in range(model.config.n_layer)
        for buffer in HF_BLOCK_BUFFERS
    }

    state: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    unexpected, misshapen, head = [], [], None
    for key, tensor in tensors.items():
        name = _current_name(_strip_prefixes(key))
        if name in ignored:
            continue
        if name == HEAD:
            head = tensor
            continue
        ours, transposed = (name, False) if name in expected else from_hf.get(name, (None, False))
        if ours is None:
            unexpected.append(key)
            continue
        if ours in origin:
            raise CheckpointError(f"{source}: keys {origin[ours]!r} and {key!r} both hold {ours}")
        origin[ours] = key
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: {key} holds {tensor.dtype}, expected floating point")
        shape_in_file = expected[ours][::-1] if transposed else expected[ours]
        if tuple(tensor.shape) != shape_in_file:
            misshapen.append(f"{key}: expected {shape_in_file}, found {tuple(tensor.shape)}")
        state[ours] = tensor.t() if transposed else tensor

    missing = [f"{name} (HF: {hf_name(name)[0]})" for name in expected if name not in state]
    problems = {
        "missing keys": missing, "unexpected keys": unexpected, "shape mismatches": misshapen,
    }
    if any(problems.values()):
        listed = (
            f"{what} ({len(keys)}): {_listing(keys)}" for what, keys in problems.items() if keys
        )
        raise CheckpointError(
            f"{source} does not match the GPT-2 of {_describe(model.config)}; " + "; ".join(listed)
        )
    embedding = state[EMBEDDING]
    untied = head is not None and (head.shape != embedding.shape or (
        not head.is_meta and not torch.equal(head, embedding)))
    if untied:
        raise CheckpointError(
            f"{source}: {HEAD} differs from the token embedding: this checkpoint has an untied "
            "output head, and gpt2_decl supports only GPT-2's tied one"
        )
    return state


def read_tensors(file: Path, device: torch.device) -> dict[str, Tensor]:
    """Every tensor in a safetensors or PyTorch weights file, loaded onto `device` (on "meta":
    their shapes and dtypes only, from the safetensors header without reading the data).

    PyTorch files are read with `weights_only=True`: a checkpoint can never run code.
    """
    if file.suffix == ".safetensors" and device.type == "meta":
        return read_safetensors_header(file)
    if file.suffix == ".safetensors":
        try:
            with safetensors.safe_open(file, "pt") as opened:
                checksums = (opened.metadata() or {}).get(CHECKSUM_KEY)
            if checksums is None:
                return safetensors.torch.load_file(file, device=str(device))
            # Checked on the CPU, where the bytes are, before they move to `device`.
            tensors = safetensors.torch.load_file(file)
        except safetensors.SafetensorError as error:
            raise CheckpointError(f"{file} is truncated or corrupt: {error}") from error
        verify_checksums(tensors, json.loads(checksums), file)
        return {name: tensor.to(device) for name, tensor in tensors.items()}
    try:
        loaded = torch.load(file, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch reports a corrupt file and a forbidden object alike: name both.
        raise CheckpointError(
            f"{file} is truncated or corrupt, or holds objects other than tensors, which "
            "weights_only=True refuses so that loading a checkpoint can never run code"
        ) from error
    except (RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(f"{file} is truncated or corrupt: {error}") from error
    if not (isinstance(loaded, Mapping) and all(isinstance(v, Tensor) for v in loaded.values())):
        raise CheckpointError(
            f"{file}: expected a state dict (names to tensors), found {_summary(loaded)}"
        )
    return dict(loaded)


# safetensors' names of the floating dtypes a checkpoint may hold.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16}


def read_safetensors_header(file: Path) -> dict[str, Tensor]:
    """Meta tensors of the shapes and dtypes a safetensors file's header lists (its first bytes:
    a little-endian u64 length, then JSON)."""
    try:
        with open(file, "rb") as opened:
            length = int.from_bytes(opened.read(8), "little")
            header = json.loads(opened.read(length))
        return {
            name: torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES.get(entry["dtype"],
                                                                           torch.int64),
                              device="meta")
            for name, entry in header.items() if name != "__metadata__"
        }
    except (OSError, ValueError, KeyError, TypeError, MemoryError) as error:
        raise CheckpointError(f"{file} has no readable safetensors header: {error}") from error


def weight_files(directory: Path) -> list[Path]:
    """The weights files of a checkpoint directory: one file, or the shards an index lists."""
    for name in WEIGHT_FILES:
        file = directory / name
        if not file.is_file():
            continue
        if not name.endswith(INDEX_SUFFIX):
            return [file]
        weight_map = _read_json(file).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{file} has no \"weight_map\" of keys to shard files")
        shards = [directory / shard for shard in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise CheckpointNotFoundError(f"{file} lists {shard.name}, which does not exist")
        return shards
    raise CheckpointNotFoundError(
        f"{directory} holds no weights: expected one of {', '.join(WEIGHT_FILES)}"
    )


def read_config(file: Path) -> GPT2Config:
    """The architecture a Hugging Face `config.json` describes, refusing what gpt2_decl lacks."""
    return config_from_hf(_read_json(file), source=file)


def config_from_hf(hf: Mapping[str, Any], source: Path | str = CONFIG_FILE) -> GPT2Config:
    def refuse(reason: str) -> CheckpointError:
        return CheckpointError(f"{source}: unsupported config: {reason}")

    model_type = hf.get("model_type", HF_MODEL_TYPE)
    if model_type != HF_MODEL_TYPE:
        raise refuse(f"model_type is {model_type!r}, expected {HF_MODEL_TYPE!r}")
    activation = hf.get("activation_function", TANH_GELUS[0])
    if activation not in TANH_GELUS:
        raise refuse(
            f"activation_function is {activation!r}; GPT-2 uses the tanh approximation of GELU "
            f"({' or '.join(map(repr, TANH_GELUS))}), the only one implemented"
        )
    for option, value in FIXED_OPTIONS.items():
        if hf.get(option, value) != value:
            raise refuse(f"{option} is {hf[option]!r}; only {option}={value!r} is implemented")
    required = ("vocab_size", "n_embd", "n_layer", "n_head")
    absent = [field for field in required if field not in hf]
    if "n_positions" not in hf and "n_ctx" not in hf:
        absent.append("n_positions")
    if absent:
        raise CheckpointError(f"{source}: config lacks {', '.join(absent)}")
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != GPT2Config.MLP_RATIO * hf["n_embd"]:
        raise refuse(
            f"n_inner is {n_inner}; only {GPT2Config.MLP_RATIO} x n_embd (or null) is implemented"
        )
    dropouts = {field: hf.get(field, HF_DEFAULT_DROPOUT) for field in HF_DROPOUTS}
    if len(set(dropouts.values())) > 1:
        warnings.warn(
            f"{source}: dropout rates differ ({dropouts}); gpt2_decl has one rate and uses "
            f"resid_pdrop={dropouts['resid_pdrop']} for all",
            stacklevel=2,
        )
    optional = {
        "layer_norm_eps": hf.get("layer_norm_epsilon"),
        "init_std": hf.get("initializer_range"),
    }
    try:
        return GPT2Config(
            vocab_size=hf["vocab_size"],
            n_ctx=hf.get("n_positions", hf.get("n_ctx")),
            d_model=hf["n_embd"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            dropout=dropouts["resid_pdrop"],
            **{name: value for name, value in optional.items() if value is not None},
        )
    except (TypeError, ValueError) as error:
        raise refuse(str(error)) from error


def config_to_hf(config: GPT2Config, dtype: torch.dtype) -> dict[str, Any]:
    """The Hugging Face `config.json` contents for a GPT-2 of `config` stored in `dtype`."""
    hf = {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "activation_function": TANH_GELUS[0],
        "vocab_size": config.vocab_size,
        "n_positions": config.n_ctx,
        "n_embd": config.d_model,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": config.init_std,
        **{field: config.dropout for field in HF_DROPOUTS},
        **FIXED_OPTIONS,
        "dtype": str(dtype).removeprefix("torch."),
    }
    # Null, not absent, outside the vocabulary: HF would default them to 50256, then warn.
    end_of_text = END_OF_TEXT_ID if END_OF_TEXT_ID < config.vocab_size else None
    return {**hf, "bos_token_id": end_of_text, "eos_token_id": end_of_text}


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write `model` as `config.json` + `model.safetensors` in HF's names and layout.

    `transformers.GPT2LMHeadModel.from_pretrained(directory)` loads the result. The directory
    changes in one atomic step (see `atomic_directory`): a crash at any moment leaves the whole
    old checkpoint or the whole new one. Other files already there (a tokenizer's, say) are
    kept; weights files of other formats are removed, so they cannot shadow the new ones. Each
    tensor's CRC-32 goes into the file's metadata, for loading to check.
    """
    refuse_quantized(model)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == HEAD:  # tied: the token embedding, saved once
            continue
        hf, transposed = hf_name(name)
        tensor = tensor.detach().t() if transposed else tensor.detach()
        tensors[HF_PREFIX + hf] = tensor.cpu().contiguous()
    checksums = crc32s(tensors)
    metadata = {"format": "pt", CHECKSUM_KEY: json.dumps(checksums, sort_keys=True)}
    config = json.dumps(config_to_hf(model.config, model.dtype), indent=2) + "\n"
    with atomic_directory(directory) as staging:
        safetensors.torch.save_file(tensors, staging / SAFETENSORS_FILE, metadata=metadata)
        (staging / CONFIG_FILE).write_text(config)
        carry_over(Path(directory), staging, skip=_is_weights_file)


def refuse_quantized(model: nn.Module) -> None:
    if has_subclass_weights(model):
        raise ValueError("a quantized model is not saved: save the float model, and quantize it "
                         "again after loading (quantizing takes seconds)")


def crc32(tensor: Tensor) -> int:
    """The CRC-32 of a contiguous CPU tensor's bytes."""
    return zlib.crc32(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")


def crc32s(tensors: Mapping[str, Tensor]) -> dict[str, int]:
    """Each tensor's CRC-32, computed on every core (zlib lets go of the GIL while it works)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        return dict(zip(tensors, pool.map(crc32, tensors.values()), strict=True))


def verify_checksums(
    tensors: Mapping[str, Tensor], checksums: Mapping[str, int], file: Path
) -> None:
    """Raise CheckpointError naming `file` and the first tensor whose bytes are not the ones
    saved (or that is missing)."""
    missing = [name for name in checksums if name not in tensors]
    found = crc32s({name: tensors[name] for name in checksums if name in tensors})
    for name, expected in checksums.items():
        if name in missing or found[name] != expected:
            raise CheckpointError(
                f"{file} is corrupt: tensor {name!r} does not match the checksum written when "
                "it was saved"
            )


def _is_weights_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", INDEX_SUFFIX))


def _current_name(name: str) -> str:
    """Our name for a parameter that an earlier version of gpt2_decl named `name`."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == OUR_BLOCKS and parts[2] in EARLIER_BLOCK_MODULES:
        return f"{OUR_BLOCKS}.{parts[1]}.{EARLIER_BLOCK_MODULES[parts[2]]}.{parts[3]}"
    return name


def _strip_prefixes(key: str) -> str:
    return key.replace(COMPILE_PREFIX, "").removeprefix(DDP_PREFIX).removeprefix(HF_PREFIX)


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointNotFoundError(f"{file} does not exist")
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON: {error}") from error
    if not isinstance(content, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(content).__name__}")
    return content


def _listing(items: list[str]) -> str:
    more = f", and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def _describe(config: GPT2Config) -> str:
    return (
        f"n_layer={config.n_layer}, d_model={config.d_model}, vocab_size={config.vocab_size}, "
        f"n_ctx={config.n_ctx}"
    )


def _summary(value: object) -> str:
    if isinstance(value, Mapping):
        kinds = {type(item).__name__ for item in value.values()}
        return f"a mapping holding {', '.join(sorted(kinds))}"
    return type(value).__name__
