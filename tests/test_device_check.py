"""The GPU machine's device check, run at tiny sizes on the CPU, so that it does not rot
between the runs on a GPU: every part runs and gives its figures."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_device_check_runs_every_part_on_the_cpu(tmp_path):
    done = subprocess.run(["bash", "scripts/device_check.sh", "--device", "cpu", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    for part in ("forward", "training", "decode", "decode_batch", "capture"):
        assert part in report and "error" not in report[part], (part, report.get(part))
    assert report["decode"]["same_tokens"] is True  # greedy tokens equal transformers'
    assert "| figure | measured | target on a GPU |" in (tmp_path / "device_check.md").read_text()
