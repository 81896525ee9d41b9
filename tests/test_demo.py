"""The main job, in its quick form: every stage runs and leaves its run folders."""

import json

from unipo.demo import run_demo


def test_quick_demo_runs_every_stage(tmp_path):
    rows = run_demo(out=str(tmp_path / "demo"), quick=True)
    assert [r["stage"].split(" (")[0] for r in rows] == ["initial", "after sft", "after luffy_paper"]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["pass@1"] <= row["pass@4"] <= 1.0
    for stage in ("sft", "luffy_paper"):
        folder = tmp_path / "demo" / stage
        assert (folder / "metrics.jsonl").exists() and (folder / "curves.png").exists()
        assert (folder / "checkpoint-4").is_dir()


def test_a_second_demo_replaces_the_first_demos_run_folders(tmp_path):
    out = tmp_path / "demo"
    run_demo(out=str(out), quick=True)
    run_demo(out=str(out), quick=True)
    lines = (out / "sft" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # not appended to the first demo's
