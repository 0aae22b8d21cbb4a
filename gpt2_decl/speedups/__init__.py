"""CPU speed-ups, applied from outside the model by one visible step: `tune` measures which pay
for a model on this machine and gives a `Plan`, which `gpt2_decl.compile(model, plan=plan)` and
`model.generate(..., plan=plan)` apply. See docs/cpu-speedups.md."""

from gpt2_decl.speedups.plan import Plan, PlanError
from gpt2_decl.speedups.tune import tune

__all__ = ["Plan", "PlanError", "tune"]
