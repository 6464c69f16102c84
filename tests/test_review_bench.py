"""benchmarks/review.py: the review stages of a finished run, each a child process timed from outside. What they
cost on the whole dataset is measured on purpose (docs/BENCHMARKS.md), never asserted here; the commands
themselves are tested in test_cli.py."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks import review, val_size

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tiny_root, tmp_path_factory):
    from tinyfast.train import fit
    return fit(tiny_root, epochs=1, lr=0.05, size=16, bs=16, out=tmp_path_factory.mktemp("review") / "run",
               quiet=True).run_dir


def test_each_stage_has_its_own_peak_memory_and_exit_code():
    """`os.wait4` gives each child's own peak RSS: a small stage after a large one is not reported at the large
    one's peak (what `getrusage(RUSAGE_CHILDREN)`, the largest child so far, would say). Run from a small parent,
    as benchmarks/review.py is: Linux counts in a child's peak what it shared with its parent before `exec`, and
    this test process is large."""
    script = textwrap.dedent("""\
        import json, sys
        from benchmarks import review
        large = review.run_stage([sys.executable, "-c", "b = bytearray(600 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('large')"])
        small = review.run_stage([sys.executable, "-c", "print('small')"])
        failed = review.run_stage([sys.executable, "-c", "import sys; print('no such run'); sys.exit(3)"])
        print(json.dumps([large, small, failed]))
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    large, small, failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert large["exit_code"] == small["exit_code"] == 0 and failed["exit_code"] == 3
    assert large["peak_rss_gib"] >= 0.55 and small["peak_rss_gib"] < 0.1
    assert large["last_lines"] == ["large"] and failed["last_lines"] == ["no such run"]
    assert small["wall_s"] >= 0


def test_findings_are_what_the_stages_wrote(run_dir):
    from tinyfast.cam_report import gradcam
    from tinyfast.interpret import evaluate, interpret
    from tinyfast.train import load_run

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


def test_validating_at_other_sizes_keeps_the_val_set_and_the_trained_sizes_score(run_dir):
    """benchmarks/val_size.py: at the size it trained at, the model scores what fit recorded; at another size
    the same val images go through the same model."""
    from tinyfast.run_folder import read_metrics
    rows = val_size.validate_at_sizes(run_dir, [16, 32], bs=16)
    assert [r["size"] for r in rows] == [16, 32]
    assert rows[0]["top1"] == pytest.approx(read_metrics(run_dir)[-1]["accuracy"], abs=1e-4)
    assert all(0.0 <= r["top1"] <= r["top5"] <= 1.0 and r["loss"] > 0 for r in rows)
