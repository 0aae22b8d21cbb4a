"""Weight-only int8 for decoding, through torchao: each linear layer's matrix (the output head's
too) becomes int8 with a float scale per output row, so a decoding step, which reads every
weight once, reads a quarter of float32's bytes. Applied from outside, in place:

    gpt2_decl.quantize(model, "int8")

Products stay in float (the weight dequantized); a plan's GEMV kernel reads the int8 rows as
they are. The token embedding stays in the model's dtype for the lookups of the input tokens,
one row per token; the output head, tied to it in float, gets an int8 copy of its own. Quantized
models are for inference: they neither train nor save (save the float model; quantize after
loading). See docs/quantization.md.
"""

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2_decl.core.tensors import inner_tensor_names

SCHEMES = ("int8",)


def quantize(model: nn.Module, scheme: str = "int8") -> nn.Module:
    """Quantize `model`'s linear layers in place with torchao's `Int8WeightOnlyConfig`;
    returns the model, in eval mode."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; expected one of {', '.join(SCHEMES)}")
    if model.training:
        raise ValueError("quantized weights are for inference, not training: call model.eval() "
                         "first (and train the float model)")
    if is_quantized(model):
        raise ValueError("the model is quantized already")
    if model.device.type == "cpu" and model.dtype == torch.float16:
        raise ValueError("int8 on the CPU takes a float32 or bfloat16 model, got float16")
    torchao = _torchao()
    # set_inductor_config=False: torchao would otherwise change inductor's settings for the
    # whole process, and so every other model compiled after this one.
    config = torchao.Int8WeightOnlyConfig(set_inductor_config=False)
    torchao.quantize_(model, config, filter_fn=lambda module, _: isinstance(module, nn.Linear))
    if not is_quantized(model):
        raise RuntimeError("this torchao did not give the int8 weights (qdata, scale per row) "
                           "that gpt2_decl reads: install torchao>=0.18")
    return model


def _torchao():
    # torchao warns, on import, of its compiled kernels built for other torch versions and
    # of its enum registrations: none of which int8 weight-only needs.
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization
    except ImportError:
        raise ImportError("quantizing needs torchao: pip install torchao "
                          "(or the project's [quantize] extra)") from None
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    return torchao.quantization


def is_quantized(model: nn.Module) -> bool:
    return any(int8_rows(parameter) is not None for parameter in model.parameters())


def weights_kind(model: nn.Module) -> str:
    """"float", or the quantization scheme of the model's weights ("int8")."""
    return "int8" if is_quantized(model) else "float"


def int8_rows(weight: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """(qdata, scale, zero_point) of a torchao weight-only int8 weight, rows dequantizing as
    (qdata - zero_point) * scale; None for a plain tensor."""
    if "qdata" not in inner_tensor_names(weight) or weight.qdata.dtype != torch.int8:
        return None
    per_row = list(getattr(weight, "block_size", ())) == [1, weight.shape[-1]]
    if not per_row or getattr(weight, "act_quant_kwargs", None) is not None \
            or getattr(weight, "act_pre_scale", None) is not None:
        raise ValueError("only weight-only int8 with one scale per row is read here, as "
                         "gpt2_decl.quantize makes it")
    return weight.qdata, weight.scale, weight.zero_point


@dataclass(frozen=True)
class Agreement:
    """How a quantized model's next-token predictions compare with the model it came from."""

    top1: float  # share of positions where both models' most likely next token is the same
    loss: float  # the quantized model's mean next-token loss
    reference_loss: float
    tokens: int

    @property
    def loss_increase(self) -> float:
        return self.loss - self.reference_loss


@torch.no_grad()
def agreement(reference: nn.Module, quantized: nn.Module, windows: Iterator[tuple[Tensor, Tensor]]
              ) -> Agreement:
    """Top-1 agreement and both losses over (inputs, targets) windows of real text."""
    same = loss = reference_loss = count = 0
    for inputs, targets in windows:
        expected = reference(inputs, check_values=False).float()
        produced = quantized(inputs, check_values=False).float()
        same += int((expected.argmax(-1) == produced.argmax(-1)).sum())
        reference_loss += float(F.cross_entropy(expected.flatten(0, 1), targets.flatten(),
                                                reduction="sum"))
        loss += float(F.cross_entropy(produced.flatten(0, 1), targets.flatten(), reduction="sum"))
        count += targets.numel()
    if count == 0:
        raise ValueError("no windows of text to compare on")
    return Agreement(top1=same / count, loss=loss / count, reference_loss=reference_loss / count,
                     tokens=count)
