"""Looking inside the model: activation patching sweeps, attribution patching, and pictures of
attention patterns and the logit lens, on top of the model's own capture and patching
(`GPT2.run_with_cache`, `GPT2.run_with_patches`). See docs/activations.md."""

from gpt2_decl.interpret.patching import attribution_patching, patch_sweep

__all__ = ["attribution_patching", "patch_sweep"]
