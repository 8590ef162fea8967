import json


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


def test_phase_breakdown_stacks_each_steps_phase_seconds(tmp_path, capsys):
    rows = [{"step": 0, "time/eval": 3.0}] + [
        {"step": i, "time/generate": 1.0, "time/train": 0.5, "time/reward": 0.0} for i in (1, 2)]
    run = write_run(tmp_path / "rlvr", rows)
    out = tmp_path / "phases.png"
    assert main([str(run), "--phases", "--out", str(out)]) == 0
    assert "generate, train" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bare = write_run(tmp_path / "bare", [{"step": 1, "loss": 1.0}])
    assert main([str(bare), "--phases", "--out", str(out)]) == 2
    assert "no per-phase timings" in capsys.readouterr().err
