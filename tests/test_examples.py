import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_forward(*flags: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "forward.py"), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_forward_example_runs_gpt2_small_end_to_end_on_a_text_prompt():
    out = run_forward("--prompt", "Hello world", "--typecheck")
    assert "124,439,808 (tied); 163,037,184 counted untied" in out
    assert "typechecked mode on" in out
    assert "input       tokens (1, 2)" in out  # "Hello world" is [15496, 995]
    assert "logits      (1, 2, 50257) torch.float32" in out
    next_tokens = out.split("next token  ")[1].split(" (")[0]
    assert len(json.loads(next_tokens)) == 1  # one id per sequence
    assert "after 'Hello world', most likely next tokens:" in out
    assert out.count("  p=") == 5
    assert "the weights are random" in out
    assert "eager forward" in out


@pytest.mark.slow
def test_forward_example_compiled_in_bfloat16():
    out = run_forward(
        "--preset", "small", "--seq", "4", "--batch", "1", "--dtype", "bfloat16", "--compile"
    )
    assert "logits      (1, 4, 50257) torch.bfloat16" in out
    assert "compiled forward" in out and "compile     " in out


def test_forward_example_refuses_an_empty_prompt(monkeypatch):
    # Run as a script, in this process (a new one would spend seconds starting torch): the exit
    # it raises is what Python prints and exits non-zero with.
    monkeypatch.setattr(sys, "argv", ["forward.py", "--prompt", ""])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "examples" / "forward.py"), run_name="__main__")
    assert exit_info.value.code == "error: --prompt is empty; give at least one character of text"


@pytest.mark.slow
def test_the_induction_heads_example_finds_heads_whose_ablation_undoes_the_repeat(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "induction_heads.py"),
                             "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    trained = re.search(r"^loss on the first copy ([\d.]+) .*, on the repeat ([\d.]+)$", out, re.M)
    first, repeat = float(trained[1]), float(trained[2])
    assert repeat < first / 4  # the repeat is predicted
    assert "induction heads (score >= 0.3): block 1 head" in out
    ablated = float(re.search(r"^with the induction heads zeroed: .*, on the repeat ([\d.]+)$",
                              out, re.M)[1])
    assert ablated > 3 * repeat  # ablating them brings the repeat's loss back up
    assert (tmp_path / "head-scores.png").exists() and (tmp_path / "patterns.png").exists()
