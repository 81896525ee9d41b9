"""Rollout engines side by side: unipo's native sampler vs the colocated vLLM engine (unipo.engine), tokens/s.

16 prompts x 8 completions x 32 new tokens (EOS disabled, so every row generates all 32 and both engines do the
same work), on the embedded "tiny" (~1.0M) and "small" (~31.5M) models, in float32 and bfloat16 (the weights'
dtype, as `model_dtype` sets it). In each configuration the two engines run alternately, `--repeats` rounds after
one warm-up each, and the median is kept, so load from other processes hits both alike. Also measured: the vLLM
engine's start and its weight push (`sync`, median of the same rounds). Needs vLLM (the environment
.ci/vllm_env.sh builds); prints a table and sentences computed from it, and writes benchmarks/out/engine_speed.json.

    $(bash .ci/vllm_env.sh) benchmarks/engine_speed.py [--repeats 5] [--threads N] [--models tiny small]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from unipo.engine.native import NativeEngine
from unipo.engine.vllm import VLLMEngine
from unipo.models import build_tiny_model

NUM_PROMPTS, GROUP_SIZE, NEW_TOKENS = 16, 8, 32
OUT = Path(__file__).parent / "out" / "engine_speed.json"


def _prompts(tokenizer) -> list[list[int]]:
    texts = [f"Question {i}: what is {7 * i + 3} + {11 * i}? Answer:" for i in range(NUM_PROMPTS)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _rollout(engine, prompts):
    def run() -> None:
        gen = engine.generate(prompts, group_size=GROUP_SIZE, max_new_tokens=NEW_TOKENS, eos_token_id=-1,
                              pad_token_id=0, generator=torch.Generator().manual_seed(0))
        assert gen.completion_ids.shape == (NUM_PROMPTS * GROUP_SIZE, NEW_TOKENS), gen.completion_ids.shape
    return run


def measure(size: str, dtype: str, repeats: int) -> dict[str, float]:
    model, tokenizer = build_tiny_model(size, dtype=dtype)
    prompts = _prompts(tokenizer)
    started = time.perf_counter()
    vllm = VLLMEngine(model, kv_cache_gib=0.5, seed=0)
    start_seconds = time.perf_counter() - started
    try:
        contenders = {"native": _rollout(NativeEngine(model), prompts), "vllm": _rollout(vllm, prompts)}
        for run in contenders.values():
            run()  # warm-up
        seconds: dict[str, list[float]] = {name: [] for name in contenders}
        pushes = []
        for _ in range(repeats):
            for name, run in contenders.items():
                began = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - began)
            vllm.sync(model)
            pushes.append(vllm.last_sync_seconds)
    finally:
        vllm.close()
    tokens = NUM_PROMPTS * GROUP_SIZE * NEW_TOKENS
    result = {f"{name}_tokens_per_s": tokens / statistics.median(times) for name, times in seconds.items()}
    result.update(vllm_start_seconds=start_seconds, vllm_push_seconds=statistics.median(pushes),
                  parameters=sum(p.numel() for p in model.parameters()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--models", nargs="+", default=["tiny", "small"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"{NUM_PROMPTS} prompts x {GROUP_SIZE} completions x {NEW_TOKENS} tokens, {threads} thread(s), "
          f"median of {args.repeats} alternating rounds")
    print(f"{'model':6} {'dtype':9} {'params':>7} {'native tok/s':>12} {'vLLM tok/s':>11} {'vLLM/native':>11} "
          f"{'push ms':>8} {'start s':>8}")
    rows = []
    for size in args.models:
        for dtype in args.dtypes:
            r = measure(size, dtype, args.repeats)
            ratio = r["vllm_tokens_per_s"] / r["native_tokens_per_s"]
            rows.append({"model": size, "dtype": dtype, **r, "vllm_over_native": ratio})
            print(f"{size:6} {dtype:9} {r['parameters'] / 1e6:6.1f}M {r['native_tokens_per_s']:12,.0f} "
                  f"{r['vllm_tokens_per_s']:11,.0f} {ratio:11.2f} {r['vllm_push_seconds'] * 1000:8.1f} "
                  f"{r['vllm_start_seconds']:8.1f}", flush=True)
    print()
    for row in rows:
        faster = "vLLM" if row["vllm_over_native"] > 1 else "the native sampler"
        factor = max(row["vllm_over_native"], 1 / row["vllm_over_native"])
        print(f"{row['model']} in {row['dtype']}: {faster} is {factor:.2f}x as fast; a weight push costs "
              f"{row['vllm_push_seconds'] * 1000:.0f} ms, "
              f"{row['vllm_push_seconds'] * row['vllm_tokens_per_s'] / (NUM_PROMPTS * GROUP_SIZE * NEW_TOKENS):.1%}"
              f" of one vLLM rollout batch of this size.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": threads, "repeats": args.repeats, "prompts": NUM_PROMPTS,
                                    "group_size": GROUP_SIZE, "new_tokens": NEW_TOKENS,
                                    "torch": torch.__version__, "machine": platform.machine(),
                                    "processor": platform.processor(), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
