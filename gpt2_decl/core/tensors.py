"""What a parameter is stored in: a plain tensor, or a tensor subclass (torchao's quantized
weights) that holds plain inner tensors."""

from torch import Tensor, nn


def inner_tensor_names(tensor: Tensor) -> list[str]:
    """The attributes holding a tensor subclass's inner tensors (torchao's quantized weights:
    "qdata", "scale", ...); none for a plain tensor."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    return list(flatten()[0]) if flatten is not None else []


def stored_tensors(tensor: Tensor) -> list[Tensor]:
    """The plain tensors holding `tensor`'s data: itself, or a subclass's inner tensors (found
    recursively), whose bytes it takes and whose versions count its changes in place."""
    names = inner_tensor_names(tensor)
    if not names:
        return [tensor]
    return [stored for name in names for stored in stored_tensors(getattr(tensor, name))]


def stored_bytes(tensor: Tensor) -> int:
    """Bytes a tensor holds in memory: a quantized one's inner tensors, not its nominal dtype."""
    return sum(stored.nbytes for stored in stored_tensors(tensor))


def has_subclass_weights(model: nn.Module) -> bool:
    """Whether any parameter is a tensor subclass (a quantized weight, say), not a plain tensor."""
    return any(inner_tensor_names(parameter) for parameter in model.parameters())
