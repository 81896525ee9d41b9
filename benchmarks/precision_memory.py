"""Peak memory and step time of one training step under each precision / memory setting.

    python benchmarks/precision_memory.py [--rounds 2] [--json benchmarks/out/precision_memory.json]

Settings: float32; float32 with gradient checkpointing; bf16 autocast over float32 weights (`bf16=true`);
bfloat16 weights (`model_dtype=bfloat16`). Model: the "small" tiny-family Qwen2 (`tiny:small`, ~31.5M parameters),
GRPO on a coin-flip reward, 2 prompts x 8 rollouts of up to 32 tokens.

Each measurement runs in a fresh subprocess (torch's CPU allocations are invisible to torch.cuda and to
tracemalloc), settings alternating round by round. In the child: the trainer is built and a batch sampled, then
the current RSS is read; the first `Trainer.learn` on the batch (forward, backward, AdamW step, which also
allocates AdamW's moments) is run and the process's peak RSS (ru_maxrss) read again. "step peak" is that peak
minus the RSS before the step; "process peak" is the child's whole peak. Step time is the median of 2 more
`learn` calls on the same batch. Printed: the CPU (model, bf16/AMX flags), a table, and sentences computed from
the numbers. JSON: benchmarks/out/precision_memory.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_info  # benchmarks/machine.py (this script's folder is on sys.path)

SETTINGS = {
    "fp32": {},
    "fp32 + checkpointing": {"gradient_checkpointing": True},
    "bf16 autocast": {"bf16": True},
    "model_dtype=bfloat16": {"model_dtype": "bfloat16"},
}


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def child(setting: str) -> None:
    import torch

    from unipo.config import OptimConfig, RolloutConfig, TrainConfig
    from unipo.recipes import get_recipe
    from unipo.tasks.base import TASKS, Problem, Task
    from unipo.trainer import Trainer

    class CoinTask(Task):
        name, max_new_tokens, scorer_is_safe = "bench_coin", 32, True

        def sample(self, n, *, seed, split="train"):
            return [Problem(prompt=f"{(seed * 7 + i) % 97} + {i}?", answer="0", demonstration="0")
                    for i in range(n)]

        def score(self, problem, completion):
            return float(bool(completion) and ord(completion[0]) % 2 == 0)

    TASKS.register(CoinTask.name)(lambda **_: CoinTask())
    torch.set_num_threads(os.cpu_count() or 1)
    config = TrainConfig(recipe=get_recipe("grpo"), task=CoinTask.name, model="tiny:small", steps=10, seed=0,
                         device="cpu", rollout=RolloutConfig(prompts_per_step=2, group_size=8),
                         optim=OptimConfig(lr=1e-5))
    trainer = Trainer(dataclasses.replace(config, **SETTINGS[setting]), progress=False)
    trainer.model.eval()
    with trainer.autocast():
        batch, _ = trainer.collector.collect(seed=0, step=0)
    before, peak_before = _rss_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    metrics, finite = trainer.learn(batch)
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(2):
        start = time.perf_counter()
        trainer.learn(batch)
        times.append(time.perf_counter() - start)
    print(json.dumps({"setting": setting, "step_peak_mib": (peak_after - before) / 1024,
                      "peak_rose_in_step": peak_after > peak_before, "process_peak_mib": peak_after / 1024,
                      "step_s": statistics.median(times), "loss": float(metrics["loss"]), "finite": finite,
                      "tokens": int(batch.completion_mask.sum()), "stepped": float(metrics["actor/updates"])}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=str(Path(__file__).parent / "out" / "precision_memory.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    cpu = cpu_info()
    bf16_hw = "has" if cpu["avx512_bf16"] or cpu["amx_bf16"] else "has no"
    print(f"CPU: {cpu['model']} ({cpu['cores']} cores); avx512_bf16={cpu['avx512_bf16']} "
          f"amx_bf16={cpu['amx_bf16']}: it {bf16_hw} native bf16 matmul instructions")
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name in SETTINGS:  # alternate: round 1 all settings, round 2 all settings, ...
            out = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True,
                                 check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for name, results in runs.items():
        rows.append({"setting": name, **{k: statistics.median(r[k] for r in results)
                                         for k in ("step_peak_mib", "process_peak_mib", "step_s")},
                     "peak_rose_in_step": all(r["peak_rose_in_step"] for r in results),
                     "tokens": results[0]["tokens"], "runs": len(results)})
    print(f"\n| setting | step peak RSS (MiB) | process peak RSS (MiB) | step s | "
          f"(median of {args.rounds}, tokens/step {rows[0]['tokens']}) |")
    print("|---|---|---|---|---|")
    for row in rows:
        note = "" if row["peak_rose_in_step"] else "peak set before the step"
        print(f"| {row['setting']} | {row['step_peak_mib']:.0f} | {row['process_peak_mib']:.0f} | "
              f"{row['step_s']:.2f} | {note} |")
    by = {row["setting"]: row for row in rows}
    base = by["fp32"]
    print()
    for name, row in by.items():
        if name == "fp32":
            continue
        memory = row["step_peak_mib"] / base["step_peak_mib"] if base["step_peak_mib"] > 0 else float("nan")
        print(f"{name}: step peak RSS {memory:.2f}x fp32's ({row['step_peak_mib']:.0f} vs "
              f"{base['step_peak_mib']:.0f} MiB), process peak {row['process_peak_mib']:.0f} vs "
              f"{base['process_peak_mib']:.0f} MiB, step time {row['step_s'] / base['step_s']:.2f}x fp32's.")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"cpu": cpu, "rounds": args.rounds, "rows": rows, "runs": runs}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
