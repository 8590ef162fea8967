"""The embedded demo at its smallest size: every stage runs and summary.json has its shape."""
import json
import subprocess
import sys

from tests.launch import REPO_ROOT


def test_demo_smallest_size(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "tools/run_demo.py", "--scale", "0.02", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_seconds"] > 0
    stages = summary["stages"]
    for stage in ("opd", "opsd_system_prompt", "opsd_answer"):
        for key in ("student_accuracy_before", "student_accuracy_after"):
            assert 0.0 <= stages[stage][key] <= 1.0
    assert set(stages) >= {"sft_teacher", "sft_student", "rlvr_teacher", "export_hf"}
    assert "opsd_system_prompt" in proc.stdout and (out / "curves.png").is_file()
    # The RLVR stage takes two PPO updates per batch and logs the engine/trainer comparison.
    assert stages["rlvr_teacher"]["logprob_diff_max"] < 1e-5
    assert stages["rlvr_teacher"]["clip_fraction"] >= 0 and (out / "phases.png").is_file()
