"""What scaling up costs and saves, side by side in one run: rollout engines, precision, processes, and a GPU step.

    .venv/bin/python benchmarks/scale.py [--rounds 2] [--steps 6] [--no-vllm] [--json benchmarks/out/scale.json]

Sections (each in its own processes, contenders alternating round by round so machine drift hits all alike):
  1. Rollout engines: unipo's native sampler vs the colocated vLLM engine, tokens/s on the "tiny" (1M) and "small"
     (31.5M) models in fp32 and bf16 (`benchmarks/engine_speed.py`, run with the vLLM environment that
     .ci/vllm_env.sh builds; skipped, saying why, where that environment cannot be built or --no-vllm).
  2. Precision: fp32, gradient checkpointing, bf16 autocast and bf16 weights: one GRPO step's peak memory and time
     on the small model (`benchmarks/precision_memory.py`).
  3. Processes: the same GRPO run (`unipo train`, small model, `--steps` steps of 8 prompts x 8 rollouts) in one
     process and in 2 (`--nproc 2`, DDP, and FSDP2): median step time after the first step, completion tokens
     trained per second, and the peak RSS of the largest process. One process uses every core; each of N processes
     uses cores / N threads, so the three use the same cores.
  4. GPU (only where CUDA is present): unipo's GRPO step against TRL's GRPOTrainer on a Qwen2.5-0.5B-shaped model
     (`benchmarks/vs_trl.py --sizes 0.5b`); needs torch, transformers, accelerate, peft and trl, no network.

Prints each section's table and sentences computed from its numbers; writes one JSON with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_info  # benchmarks/machine.py (this script's folder is on sys.path)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"


def section(title: str) -> None:
    print(f"\n## {title}\n", flush=True)


# -- 1. rollout engines ---------------------------------------------------------------------------------------
def engines(rounds: int, use_vllm: bool) -> dict:
    section("Rollout engines: native sampler vs vLLM (tokens/s)")
    if not use_vllm:
        print("skipped: --no-vllm")
        return {"skipped": "--no-vllm"}
    built = subprocess.run(["bash", str(ROOT / ".ci" / "vllm_env.sh")], capture_output=True, text=True)
    python = built.stdout.strip()
    if built.returncode != 0 or not python:
        reason = (built.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"skipped: the vLLM environment is not available here ({reason})")
        return {"skipped": reason}
    out = OUT / "scale_engines.json"
    run = subprocess.run([python, str(HERE / "engine_speed.py"), "--repeats", str(max(3, rounds)), "--threads", "1",
                          "--out", str(out)], capture_output=True, text=True)
    # vLLM's own log lines (its warnings about this CPU set-up) are not the benchmark's output
    print("\n".join(line for line in run.stdout.splitlines() if not line.startswith("(MainProcess")))
    if run.returncode != 0:
        print(f"failed: {run.stderr.strip().splitlines()[-1:]}")
        return {"failed": run.stderr[-2000:]}
    return json.loads(out.read_text())


# -- 2. precision ---------------------------------------------------------------------------------------------
def precision(rounds: int) -> dict:
    section("Precision and memory: one GRPO step on the small model")
    out = OUT / "scale_precision.json"
    run = subprocess.run([sys.executable, str(HERE / "precision_memory.py"), "--rounds", str(rounds), "--json",
                          str(out)], capture_output=True, text=True, check=True)
    print(run.stdout)
    return json.loads(out.read_text())


# -- 3. processes ---------------------------------------------------------------------------------------------
PROCESS_SETTINGS = {"1 process": (1, "ddp"), "2 processes, DDP": (2, "ddp"), "2 processes, FSDP2": (2, "fsdp")}


def _train_command(out: str, steps: int, nproc: int, mode: str) -> list[str]:
    command = [sys.executable, "-m", "unipo", "train", "--recipe", "grpo", "--task", "addition", "--model",
               "tiny:small", "--steps", str(steps), "--out", out, f"--nproc={nproc}", f"parallel={mode}",
               "rollout.prompts_per_step=8", "rollout.group_size=8", "rollout.max_new_tokens=16", "save_every=0",
               "eval_problems=8"]
    return command


def measure_run(command_json: str) -> None:
    """Child: run one training command, then print its peak RSS (the largest process, KiB) and wall time."""
    command, threads = json.loads(command_json)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        print(json.dumps({"error": done.stderr[-3000:]}))
        return
    print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "wall_s": wall}))


def processes(rounds: int, steps: int) -> dict:
    section("Processes: the same GRPO run in 1 and 2 processes (small model, 8 prompts x 8 rollouts x 16 tokens)")
    cores = os.cpu_count() or 1
    runs: dict[str, list[dict]] = {name: [] for name in PROCESS_SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(rounds):
            for name, (nproc, mode) in PROCESS_SETTINGS.items():
                out = str(Path(tmp) / f"{nproc}-{mode}-{round_}")
                threads = max(1, cores // nproc)
                child = subprocess.run([sys.executable, __file__, "--measure-run",
                                        json.dumps([_train_command(out, steps, nproc, mode), threads])],
                                       capture_output=True, text=True, check=True)
                result = json.loads(child.stdout.strip().splitlines()[-1])
                if "error" in result:
                    raise SystemExit(f"{name} failed:\n{result['error']}")
                records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
                steady = records[1:] or records  # the first step pays for warm-up (allocations, the sandbox)
                result.update(step_s=statistics.median(r["step_seconds"] for r in steady),
                              generation_s=statistics.median(r["generation_seconds"] for r in steady),
                              update_s=statistics.median(r["update_seconds"] for r in steady),
                              tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady),
                              threads=threads, nproc=nproc)
                runs[name].append(result)
    rows = []
    for name, results in runs.items():
        rows.append({"setting": name, "nproc": results[0]["nproc"], "threads_each": results[0]["threads"],
                     **{k: statistics.median(r[k] for r in results)
                        for k in ("step_s", "generation_s", "update_s", "tokens_per_s")},
                     "peak_mib": statistics.median(r["peak_kib"] for r in results) / 1024, "runs": len(results)})
    print(f"| setting | threads each | step s | generation s | update s | tokens/s | peak RSS, largest process "
          f"(MiB) |  (median of {rounds} runs x {steps - 1} steps)")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['threads_each']} | {r['step_s']:.2f} | {r['generation_s']:.2f} | "
              f"{r['update_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_mib']:.0f} |")
    base = rows[0]
    print()
    for r in rows[1:]:
        print(f"{r['setting']}: step time {r['step_s'] / base['step_s']:.2f}x one process's "
              f"({r['step_s']:.2f} vs {base['step_s']:.2f} s), peak RSS of its largest process "
              f"{r['peak_mib'] / base['peak_mib']:.2f}x ({r['peak_mib']:.0f} vs {base['peak_mib']:.0f} MiB).")
    return {"cores": cores, "steps": steps, "rows": rows, "runs": runs}


# -- 4. GPU ---------------------------------------------------------------------------------------------------
def gpu(steps: int) -> dict:
    section("GPU: unipo's GRPO step vs TRL's on a Qwen2.5-0.5B-shaped model")
    import torch

    if not torch.cuda.is_available():
        print("skipped: no CUDA device on this machine")
        return {"skipped": "no CUDA device"}
    try:
        import trl  # noqa: F401
    except ImportError:
        print("skipped: TRL is not installed (pip install trl==1.16.0; it is pure Python)")
        return {"skipped": "no trl"}
    run = subprocess.run([sys.executable, str(HERE / "vs_trl.py"), "--sizes", "0.5b", "--threads",
                          str(os.cpu_count() or 1), "--steps", f"0.5b={steps}", "--no-bf16", "--bf16-curve-steps", "0",
                          "--no-write"],
                         capture_output=True, text=True)
    print(run.stdout[-6000:])
    return {"device": torch.cuda.get_device_name(0), "returncode": run.returncode, "stdout": run.stdout[-20000:],
            "stderr": run.stderr[-4000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="training steps per process-section run")
    parser.add_argument("--no-vllm", dest="vllm", action="store_false")
    parser.add_argument("--sections", default="engines,precision,processes,gpu")
    parser.add_argument("--json", default=str(OUT / "scale.json"))
    parser.add_argument("--measure-run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_run:
        measure_run(args.measure_run)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    cpu = cpu_info()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores; avx2={cpu['avx2']} avx512f={cpu['avx512f']} "
          f"avx512_bf16={cpu['avx512_bf16']} amx_bf16={cpu['amx_bf16']}")
    wanted = set(args.sections.split(","))
    report = {"cpu": cpu}
    if "engines" in wanted:
        report["engines"] = engines(args.rounds, args.vllm)
    if "precision" in wanted:
        report["precision"] = precision(args.rounds)
    if "processes" in wanted:
        report["processes"] = processes(args.rounds, args.steps)
    if "gpu" in wanted:
        report["gpu"] = gpu(args.steps)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
