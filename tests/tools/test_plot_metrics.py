import json

import pytest

from tools.plot_metrics import main, plot_runs


def write_run(path, rows):
    path.mkdir()
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_plots_keys_present_in_runs(tmp_path):
    a = write_run(tmp_path / "a", [{"step": i, "loss": 1.0 / i} for i in range(1, 6)])
    b = write_run(tmp_path / "b", [{"step": i, "loss": 2.0 / i, "reward": i} for i in range(1, 6)])
    out = tmp_path / "curves.png"
    assert plot_runs([a, b], ["loss", "reward", "absent"], out) == ["loss", "reward"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_run_is_a_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no metrics" in capsys.readouterr().err
