"""The main job, in its quick form: every stage runs and leaves its run folders."""

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
