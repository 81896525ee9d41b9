"""unipo's `grpo` recipe against TRL's `GRPOTrainer`, side by side, on the same work; plus loss parity.

One GRPO step = 8 addition prompts x 8 completions x 16 new tokens, one forward/backward over the 64 rows and one
AdamW step (beta 0, one update per generation batch, no gradient checkpointing). Both trainers get the same
random-init Qwen2 model (same seed), the same 43-character tokenizer, the same prompt distribution, learning
rate, AdamW (fused, betas 0.9/0.99), no weight decay, clipping at 1.0 and a constant schedule. TRL runs in fp32
(`bf16=False`: its config otherwise turns on bf16 autocast, on a CPU too). Every row generates exactly 16 tokens
on both sides and EOS stays an ordinary token of the sampled distribution: TRL generates with no EOS id and its
completion mask gets an empty EOS list; unipo's collector gets EOS id -1, which is never sampled.

Each trainer lives in its own worker process (its own peak RSS; neither's global patches touch the other). The
parent alternates single steps between them (order flipped every round) so machine drift hits both alike, and
reports medians. FLOP/s are nominal and the same for both: 2*N*(B*T) for generation and 6*N*(B*(P+T)) for the
update (N parameters, B rows, P prompt and T completion tokens), against this machine's fp32 GEMM rate measured
here at the same thread count. (unipo runs each group's prompt once in the update, so it does fewer FLOPs than
the nominal count; TRL does more in generation, where it prefills all 64 rows.)

    .venv/bin/python benchmarks/vs_trl.py                 # everything; writes benchmarks/RESULTS.md
    .venv/bin/python benchmarks/vs_trl.py --parity-only   # just the loss/gradient parity check
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules beside this script

from trl_parity import parity_table, run_parity  # noqa: E402
from vs_trl_workers import (  # noqa: E402
    GROUP_SIZE,
    NEW_TOKENS,
    NUM_PROMPTS,
    bf16_effect,
    build_model,
    serve_trl,
    serve_unipo,
    training_problems,
)

RESULTS = Path(__file__).parent / "RESULTS.md"
OUT = Path(__file__).parent / "out" / "vs_trl.json"
SECTION = "## unipo vs TRL"
COMMAND = ".venv/bin/python benchmarks/vs_trl.py"


# ------------------------------------------------------------------------------------------------ measuring
def matmul_rate(threads: int, bf16: bool = False, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` GFLOP/s of `F.linear` on [size, size] x [size, size] at `threads` threads: fp32, or
    under bf16 autocast (the path the trainer's `bf16` option takes)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    x, w = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        torch.nn.functional.linear(x, w)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - started)
    torch.set_num_threads(previous)
    return 2 * size**3 / best / 1e9


class Worker:
    """A trainer in its own process, stepping on command."""

    def __init__(self, target, *args) -> None:
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=target, args=(child, *args), daemon=True)
        self.process.start()

    def step(self, command: str = "step") -> dict[str, float]:
        self.conn.send(command)
        return self.conn.recv()

    def stop(self) -> None:
        self.conn.send("stop")
        self.process.join(timeout=120)


def compare(size: str, threads: int, bf16: bool, warmup: int, steps: int):
    """Per-step records of unipo (bf16 autocast if asked) and TRL (fp32), alternating single steps; one more
    step of each under the torch profiler (its time by kind of operator); and, in fp32, the floor of unipo's
    step (`vs_trl_workers.step_floor`)."""
    workers = {"unipo": Worker(serve_unipo, size, threads, bf16), "trl": Worker(serve_trl, size, threads)}
    try:
        for _ in range(warmup):  # first steps: allocations, kernel selection, lazy imports
            for worker in workers.values():
                worker.step()
        records: dict[str, list[dict]] = {name: [] for name in workers}
        for round_ in range(steps):
            order = list(workers) if round_ % 2 == 0 else list(workers)[::-1]
            for name in order:
                records[name].append(workers[name].step())
        profiles = {name: worker.step("profile") for name, worker in workers.items()}
        if not bf16:  # the bound for fp32 work; bf16 GEMMs here are emulated and would take minutes to time
            profiles["unipo_floor"] = workers["unipo"].step("floor")
    finally:
        for worker in workers.values():
            worker.stop()
    return records, profiles


def summarise(records: list[dict], params: int, prompt_len: float) -> dict[str, float]:
    """Medians of the step records, with nominal FLOP/s (see the module docstring)."""
    median = {key: statistics.median(r[key] for r in records) for key in ("step", "generation", "update")}
    rows = NUM_PROMPTS * GROUP_SIZE
    gen_flops = 2 * params * rows * NEW_TOKENS
    update_flops = 6 * params * rows * (prompt_len + NEW_TOKENS)
    tokens = statistics.median(r["tokens"] for r in records)
    return {**median, "tokens_per_s": tokens / median["step"], "rss_mb": max(r["rss_mb"] for r in records),
            "threads": records[0]["threads"], "gflops": (gen_flops + update_flops) / median["step"] / 1e9,
            "gen_gflops": gen_flops / median["generation"] / 1e9,
            "update_gflops": update_flops / median["update"] / 1e9, "steps": len(records)}


# ------------------------------------------------------------------------------------------------ reporting
def _model_label(row: dict) -> str:
    return f"{row['size']} (bf16 run)" if row["bf16"] else row["size"]


def comparison_table(rows: list[dict]) -> list[str]:
    lines = ["| model | threads | trainer | step s | generation s | update s | completion tok/s | peak RSS MB | "
             "step GFLOP/s (% of GEMM) | gen GFLOP/s | update GFLOP/s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        model = _model_label(row)
        for name in ("trl", "unipo"):
            s = row[name]
            label = "TRL fp32" if name == "trl" else f"unipo {'bf16' if row['bf16'] else 'fp32'}"
            share = 100 * s["gflops"] / row["gemm_gflops"]
            lines.append(f"| {model} | {row['threads']} | {label} | {s['step']:.3f} | {s['generation']:.3f} | "
                         f"{s['update']:.3f} | {s['tokens_per_s']:.0f} | {s['rss_mb']:.0f} | "
                         f"{s['gflops']:.1f} ({share:.0f}%) | {s['gen_gflops']:.1f} | {s['update_gflops']:.1f} |")
        ratio = {k: row["trl"][k] / row["unipo"][k] for k in ("step", "generation", "update")}
        lines.append(f"| {model} | {row['threads']} | **TRL / unipo** | **{ratio['step']:.2f}x** | "
                     f"{ratio['generation']:.2f}x | {ratio['update']:.2f}x | | "
                     f"{row['trl']['rss_mb'] / row['unipo']['rss_mb']:.2f}x | | | |")
    return lines


def profile_table(rows: list[dict]) -> list[str]:
    kinds = ("gemm", "attention", "other ops", "optimizer", "python & dispatch")
    lines = ["| model | threads | trainer | profiled step s | " + " | ".join(kinds) + " |",
             "|---|---:|---|---:|" + "---:|" * len(kinds)]
    for row in rows:
        for name in ("trl", "unipo"):
            p = row["profile"][name]
            label = "TRL fp32" if name == "trl" else f"unipo {'bf16' if row['bf16'] else 'fp32'}"
            lines.append(f"| {_model_label(row)} | {row['threads']} | {label} | {p['wall']:.3f} | "
                         + " | ".join(f"{p[k]:.3f} ({100 * p[k] / p['wall']:.0f}%)" for k in kinds) + " |")
    return lines


def bf16_table(effect: dict) -> list[str]:
    lines = [f"One shared batch, tiny model: the bf16-autocast loss differs from fp32 by "
             f"{effect['loss_rel']:.1e} (relative) and its gradient by {effect['grad_rel']:.1e}.", "",
             f"Learning ({effect['task']}, {effect['sft_steps']} fp32 SFT warm-start steps, then grpo with "
             f"{effect['prompts']}x{effect['group']} rollouts per step; mean reward over blocks of "
             f"{effect['block']} steps):", "",
             "| steps | " + " | ".join(effect["blocks"]) + " |",
             "|---|" + "---:|" * len(effect["blocks"])]
    for name in ("fp32", "bf16"):
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in effect["curves"][name]) + " |")
    lines.append(f"\nbf16 step: {effect['seconds']['bf16']:.2f} s vs fp32 {effect['seconds']['fp32']:.2f} s "
                 f"(median, tiny model, {effect['threads']} thread(s)).")
    return lines


def token_forwards(prompt_len: float) -> dict[str, dict[str, float]]:
    """Tokens each trainer pushes through the model per step (the GEMM work is 2N per token forward, 6N per
    token in the update). unipo: each prompt once per group, and the last completion token is never fed."""
    rows, decode = NUM_PROMPTS * GROUP_SIZE, NUM_PROMPTS * GROUP_SIZE * (NEW_TOKENS - 1)
    shared = NUM_PROMPTS * prompt_len + decode
    return {"unipo": {"generation": shared, "update": shared},
            "trl": {"generation": rows * prompt_len + decode, "update": rows * (prompt_len + NEW_TOKENS)}}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            return next((set(line.split(":")[1].split()) for line in info if line.startswith("flags")), set())
    except OSError:
        return set()


def notes(rows: list[dict], meta: dict) -> list[str]:
    """What bounds each figure, from this run's numbers and profiles."""
    work = token_forwards(meta["prompt_len"])
    flops = {k: 2 * w["generation"] + 6 * w["update"] for k, w in work.items()}
    lines = [f"- Work per step (token forwards, generation + update): unipo {work['unipo']['generation']:.0f} + "
             f"{work['unipo']['update']:.0f}, TRL {work['trl']['generation']:.0f} + {work['trl']['update']:.0f} "
             f"(TRL prefills all 64 rows and trains on every row's prompt). At equal GEMM efficiency that alone "
             f"makes TRL/unipo = {flops['trl'] / flops['unipo']:.2f}x; more needs unipo to run its GEMMs more "
             f"efficiently than TRL runs its own."]
    for row in rows:
        if row["bf16"]:
            continue
        trl, ours, prof, floor = row["trl"], row["unipo"], row["profile"], row["profile"]["unipo_floor"]
        lines.append(f"- {row['size']}, {row['threads']} thread(s): TRL {trl['step']:.3f} s, unipo "
                     f"{ours['step']:.3f} s ({trl['step'] / ours['step']:.2f}x). unipo's {floor['gemm_gflop']:.2f} "
                     f"GFLOP of GEMMs take {floor['gemm_isolated']:.3f} s timed shape by shape in isolation "
                     f"(cache-hot; {floor['gemm_in_situ']:.3f} s in the step): no implementation of this work can "
                     f"beat TRL by more than {trl['step'] / floor['gemm_isolated']:.2f}x here, and with attention as "
                     f"the step runs it ({floor['attention']:.3f} s) and everything else free, "
                     f"{trl['step'] / floor['floor']:.2f}x. Counting the GEMM FLOPs it executes rather than the "
                     f"nominal ones (which credit it with the prompt work it shares), unipo runs at "
                     f"{floor['gemm_gflop'] / ours['step']:.1f} GFLOP/s over its median step, "
                     f"{100 * floor['gemm_gflop'] / ours['step'] / row['gemm_gflops']:.0f}% of the GEMM rate. "
                     f"Above the GEMMs and attention: elementwise ops ({prof['unipo']['other ops']:.3f} s) and "
                     f"Python/dispatch ({prof['unipo']['python & dispatch']:.3f} s, profiler overhead included).")
    flags = _cpu_flags()
    units = sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}) or ["none (AVX2 only)"]
    bf16_rate, fp32_rate = meta["gemm_bf16_2threads"], meta["gemm_fp32"].get(2, 0)
    verdict = (f"bf16 GEMMs run {bf16_rate / fp32_rate:.1f}x the fp32 rate here" if bf16_rate > fp32_rate
               else f"bf16 GEMMs run at {bf16_rate / max(fp32_rate, 1e-9):.2f}x the fp32 rate here, slower")
    lines.append(f"- bf16: this CPU's bf16 matmul instructions: {', '.join(units)}. F.linear under bf16 autocast "
                 f"runs at {bf16_rate:.1f} GFLOP/s against {fp32_rate:.0f} in fp32 at 2 threads: {verdict} "
                 f"(a speed-up needs bf16 matmul units: AMX, AVX512-BF16 or a GPU).")
    lines.append("- 2 threads need both cores: with one core busy (another process), every OpenMP region waits "
                 "for a descheduled thread and a step of either trainer gets 10-80x slower; these numbers were "
                 "taken on an idle machine (load average in the command line above).")
    return lines


def write_section(markdown: list[str]) -> None:
    """Replace (or add) this script's section of RESULTS.md, leaving every other section as it is."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    body = "\n".join([SECTION, *markdown]).rstrip() + "\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip() + "\n\n" + body
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + (text[end + 1:] if end >= 0 else "")
    RESULTS.write_text(text if text.endswith("\n") else text + "\n")


# ------------------------------------------------------------------------------------------------ main
def run_comparisons(args, params: dict[str, int], prompt_len: float) -> list[dict]:
    plans = [(size, threads, False) for size in args.sizes for threads in args.threads
             if threads == 2 or size == "tiny" or args.all_threads]
    if args.bf16:
        plans.append(("small", 2, True))
    rows = []
    for size, threads, bf16 in plans:
        # bf16 without bf16 matmul units (AVX2-only CPUs) takes minutes a step: no warm-up, few steps
        steps, warmup = (args.bf16_steps, 0) if bf16 else (args.steps[size], args.warmup)
        print(f"-- {size}, {threads} thread(s), unipo {'bf16' if bf16 else 'fp32'}: {warmup}+{steps} steps each",
              flush=True)
        records, profiles = compare(size, threads, bf16, warmup, steps)
        row = {"size": size, "threads": threads, "bf16": bf16, "gemm_gflops": args.gemm[threads],
               **{name: summarise(r, params[size], prompt_len) for name, r in records.items()},
               "profile": profiles}
        print("\n".join(comparison_table([row])[2:]), flush=True)
        rows.append(row)
    return rows


def load_report(start: tuple[float, float, float]) -> str:
    def show(load):
        return " / ".join(f"{x:.2f}" for x in load)
    return (f"load average (1/5/15 min) {show(start)} at the start, {show(os.getloadavg())} at the end, "
            f"this run's own load included")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small", help="comma-separated model sizes")
    parser.add_argument("--threads", default="2,1", help="thread counts (1 thread is run for the tiny model)")
    parser.add_argument("--all-threads", action="store_true", help="also run every size at every thread count")
    parser.add_argument("--steps", default="tiny=20,small=10", help="measured steps per trainer, per size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip unipo bf16 on the small model")
    parser.add_argument("--bf16-steps", type=int, default=1)
    parser.add_argument("--bf16-curve-steps", type=int, default=30, help="RL steps per run of the bf16 curve")
    parser.add_argument("--parity-only", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--render-only", action="store_true",
                        help=f"rewrite the RESULTS.md section from {OUT.name} (parity is rerun: it takes seconds)")
    args = parser.parse_args()
    args.sizes = args.sizes.split(",")
    args.threads = [int(t) for t in args.threads.split(",")]
    args.steps = {k: int(v) for k, v in (item.split("=") for item in args.steps.split(","))}
    return args


def main() -> None:
    args = parse_args()
    started, load_start = time.time(), os.getloadavg()
    model, tokenizer = build_model("tiny")
    parity = parity_table(run_parity(model, tokenizer))
    print("\n".join(parity), flush=True)
    if args.parity_only:
        return
    if args.render_only:
        saved = json.loads(OUT.read_text())
        saved["meta"]["gemm_fp32"] = {int(t): v for t, v in saved["meta"]["gemm_fp32"].items()}
        write_section(render(saved["rows"], parity, saved["bf16_effect"], saved["meta"]))
        print(f"wrote {RESULTS} from {OUT}")
        return
    params = {size: sum(p.numel() for p in build_model(size)[0].parameters()) for size in args.sizes}
    prompt_len = statistics.mean(len(p.prompt) for p in training_problems(64))
    args.gemm = {t: matmul_rate(t) for t in {*args.threads, 2}}
    gemm_bf16 = matmul_rate(2, bf16=True, size=1024, repeats=2)  # 1024^3: a CPU without bf16 units is slow
    print(f"fp32 GEMM GFLOP/s by threads: {args.gemm}; bf16 at 2 threads: {gemm_bf16:.1f}", flush=True)
    rows = run_comparisons(args, params, prompt_len)
    effect = bf16_effect(args.bf16_curve_steps, block=5) if args.bf16_curve_steps else None
    meta = {"torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "params": params, "prompt_len": prompt_len, "gemm_fp32": args.gemm, "gemm_bf16_2threads": gemm_bf16,
            "load": load_report(load_start), "seconds": time.time() - started}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"meta": meta, "rows": rows, "bf16_effect": effect}, indent=2) + "\n")
    markdown = render(rows, parity, effect, meta)
    print("\n".join(markdown))
    if not args.no_write:
        write_section(markdown)
        print(f"wrote {RESULTS} and {OUT}")


def render(rows: list[dict], parity: list[str], effect: dict | None, meta: dict) -> list[str]:
    lines = ["", f"Command: `{COMMAND}` ({meta['seconds'] / 60:.0f} min; torch {meta['torch']}, trl 1.16.0, "
             f"{meta['cpus']} CPUs, {meta['load']}).", "",
             f"Models: tiny {meta['params'].get('tiny', 0) / 1e6:.2f}M and small "
             f"{meta['params'].get('small', 0) / 1e6:.2f}M parameters, 46-token vocabulary (43 characters + 3 "
             f"special). Measured GEMM rate (F.linear 2048^3 fp32, best of 5): "
             + ", ".join(f"{v:.0f} GFLOP/s at {t} thread(s)" for t, v in sorted(meta["gemm_fp32"].items()))
             + f"; under bf16 autocast (1024^3): {meta['gemm_bf16_2threads']:.1f} GFLOP/s at 2 threads.", "",
             "### Speed (median step, alternating single steps)", "", *comparison_table(rows), "",
             "### Where the time goes (one more step of each under torch.profiler, seconds and share)", "",
             *profile_table(rows), "",
             "### Loss parity (shared batch, fp32, tolerance 1e-5 relative)", "", *parity]
    if effect:
        lines += ["", "### bf16 autocast (off by default): effect on the loss and on learning", "", *bf16_table(effect)]
    return lines + ["", "### What bounds these figures", "", *notes(rows, meta)]


if __name__ == "__main__":
    main()
