"""benchmarks/review.py: the review stages of a finished run, each a child process timed from outside. What they
cost on the whole dataset is measured on purpose (docs/BENCHMARKS.md), never asserted here; the commands
themselves are tested in test_cli.py."""
from __future__ import annotations

import sys

import pytest

from benchmarks import review


def test_each_stage_has_its_own_peak_memory_and_exit_code():
    """`os.wait4` gives each child's own peak RSS: a small stage after a large one is not reported at the large
    one's peak (what `getrusage(RUSAGE_CHILDREN)`, the largest child so far, would say)."""
    large = review.run_stage([sys.executable, "-c", "b = bytearray(600 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('large')"])
    small = review.run_stage([sys.executable, "-c", "print('small')"])
    failed = review.run_stage([sys.executable, "-c", "import sys; print('no such run'); sys.exit(3)"])
    assert large["exit_code"] == small["exit_code"] == 0 and failed["exit_code"] == 3
    assert large["peak_rss_gib"] >= 0.55 and small["peak_rss_gib"] < 0.1
    assert large["last_lines"] == ["large"] and failed["last_lines"] == ["no such run"]
    assert small["wall_s"] >= 0


def test_findings_are_what_the_stages_wrote(tiny_root, tmp_path):
    from tinyfast.cam_report import gradcam
    from tinyfast.interpret import evaluate, interpret
    from tinyfast.train import fit, load_run

    run_dir = fit(tiny_root, epochs=1, lr=0.05, size=16, bs=16, out=tmp_path / "run", quiet=True).run_dir
    assert review.findings(run_dir) == {}  # nothing reviewed yet
    learn = load_run(run_dir)
    with learn.no_bar():
        evaluated = evaluate(learn, run_dir, temperature=True)
        interpreted = interpret(learn, run_dir)
        scored = gradcam(learn, run_dir, n=4, score=True, limit=8)["scores"]
    found = review.findings(run_dir, top=3)
    assert found["evaluation"]["accuracy"] == pytest.approx(evaluated["accuracy"])
    assert "ece" in found["evaluation"] and "temperature" in found["evaluation"]
    assert [r["actual_name"] for r in found["most_confused"]] == \
        [r["actual_name"] for r in interpreted["most_confused"][:3]]
    assert found["gradcam"]["gradcam"]["pointing_game"] == pytest.approx(scored["gradcam"]["pointing_game"])


def test_review_refuses_a_folder_that_is_not_a_finished_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        review.main([str(tmp_path), "--results", str(tmp_path / "r.jsonl")])
    assert e.value.code == 2 and "not a finished run folder" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()
