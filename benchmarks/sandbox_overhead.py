"""What the reward sandbox costs: 1,000 completions of reasoning-gym tasks scored in-process vs in the sandbox.

For each task, `--n` completions (a quarter each: the gold answer, the gold answer in <answer> tags, a wrong
number, prose) over `--n / 4` problems are scored by three contenders: `score_in_process` (the task's scorer
in this process, what unipo did before the sandbox), `RewardSandbox.score` as configured by default (fork
server, `--workers` workers, a fresh scorer process forked per chunk) and with `fork_per_chunk=False` (the
worker scores itself). The contenders alternate within each repeat; the table gives medians and the overhead
per 1,000 completions. The sandboxes' one-off start-up (fork server, workers, building the task) is measured
separately. Prints a table and writes benchmarks/out/sandbox_overhead.json.

    .venv/bin/python benchmarks/sandbox_overhead.py [--repeats 7] [--n 1000] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from unipo.sandbox import DEFAULT_CHUNK, RewardSandbox
from unipo.tasks import get_task
from unipo.tasks.base import score_in_process

OUT = Path(__file__).parent / "out" / "sandbox_overhead.json"
TASKS = ("rg:spiral_matrix", "rg:countdown")


def cpu_description() -> dict[str, object]:
    """CPU model (from /proc/cpuinfo where there is one), logical cores, and the cores this process may use."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "logical_cores": os.cpu_count(), "usable_cores": usable, "machine": platform.machine()}


def workload(task, n: int) -> tuple[list, list[str]]:
    problems = task.sample(max(1, n // 4), seed=0)
    kinds = [lambda p: p.answer, lambda p: f"Thinking...\n<answer>{p.answer}</answer>", lambda p: "<answer>17</answer>",
             lambda p: "I am not sure, sorry."]
    rows = [(p, kinds[i % 4](p)) for i, p in enumerate(problems * 4)][:n]
    return [p for p, _ in rows], [c for _, c in rows]


CONTENDERS = ("in_process", "sandbox", "sandbox_reused")
LABELS = {"in_process": "in-process", "sandbox": "sandbox (fork per chunk)",
          "sandbox_reused": "sandbox (reused scorer)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--n", type=int, default=1000, help="completions per measurement")
    parser.add_argument("--workers", type=int, default=None, help="sandbox workers (default: the sandbox's own)")
    args = parser.parse_args()
    cpu = cpu_description()
    start = time.perf_counter()
    boxes = {"sandbox": RewardSandbox(args.workers),
             "sandbox_reused": RewardSandbox(args.workers, fork_per_chunk=False)}
    workers = boxes["sandbox"].n_workers
    print(f"CPU: {cpu['model']} ({cpu['logical_cores']} logical cores, {cpu['usable_cores']} usable)")
    print(f"{args.n} completions per measurement, median of {args.repeats} repeats alternating the contenders; "
          f"sandbox: {workers} worker(s), chunks of up to {DEFAULT_CHUNK} calls")
    results: dict[str, dict[str, object]] = {}
    try:
        for spec in TASKS:
            task = get_task(spec)
            problems, completions = workload(task, args.n)
            startup = {}
            for name, box in boxes.items():  # fork server (once), workers, building the task in them
                t0 = time.perf_counter()
                box.score(task, problems[:1], completions[:1])
                startup[name] = time.perf_counter() - (start if not results and name == "sandbox" else t0)
            times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
            same = True
            for _ in range(args.repeats):
                for name in CONTENDERS:
                    t = time.perf_counter()
                    if name == "in_process":
                        reference = scored = score_in_process(task, problems, completions)
                    else:
                        scored = boxes[name].score(task, problems, completions)
                    times[name].append(time.perf_counter() - t)
                    same = same and scored.rewards == reference.rewards and scored.errors == reference.errors
            medians = {name: statistics.median(values) for name, values in times.items()}
            scale = 1000 / args.n
            results[spec] = {
                "median_s": medians, "all_s": times, "startup_s": startup, "rewards_identical": same,
                "overhead_s_per_1000": {name: (medians[name] - medians["in_process"]) * scale for name in boxes},
                "ratio": {name: medians[name] / medians["in_process"] for name in boxes},
                "in_process_s_per_1000": medians["in_process"] * scale,
                "worker_restarts": {name: box.restarts for name, box in boxes.items()},
                "mean_reward": sum(reference.rewards) / len(reference.rewards),
            }
    finally:
        for box in boxes.values():
            box.close()
    print()
    print(f"{'task':18} {'contender':26} {'median s':>9} {'overhead s/1000':>15} {'ratio':>6} {'start-up s':>10}")
    for spec, r in results.items():
        for name in CONTENDERS:
            overhead = f"{r['overhead_s_per_1000'][name]:15.4f}" if name in boxes else f"{'-':>15}"
            ratio = f"{r['ratio'][name]:6.1f}" if name in boxes else f"{'-':>6}"
            startup = f"{r['startup_s'][name]:10.2f}" if name in boxes else f"{'-':>10}"
            print(f"{spec:18} {LABELS[name]:26} {r['median_s'][name]:9.4f} {overhead} {ratio} {startup}")
    print()
    for spec, r in results.items():
        print(f"{spec}: in-process {r['in_process_s_per_1000'] * 1000:.0f} ms per 1,000 completions; the sandbox adds "
              f"{r['overhead_s_per_1000']['sandbox'] * 1000:.0f} ms with a fresh scorer process per chunk and "
              f"{r['overhead_s_per_1000']['sandbox_reused'] * 1000:.0f} ms with a reused one; rewards "
              f"{'identical' if r['rewards_identical'] else 'NOT identical'} across contenders in all "
              f"{args.repeats} repeats.")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    config = {"n": args.n, "repeats": args.repeats, "workers": workers, "chunk": DEFAULT_CHUNK,
              "timeout_s": boxes["sandbox"].timeout_s, "cpu": cpu, "python": platform.python_version()}
    OUT.write_text(json.dumps({"config": config, "results": results}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
