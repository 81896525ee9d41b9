"""Micro-benchmark of `unipo.rollout.generate`: 8 prompts x 8 completions x 16 new tokens on CPU.

Runs the embedded "tiny" (~1.0M) and "small" (~31.5M) Qwen2 models with and without the shared prompt cache,
plus Hugging Face `model.generate` on the same 64 rows for reference. EOS is disabled (eos id -1) so every
row generates exactly 16 tokens and all variants do the same work. Prints a table and writes the medians
to benchmarks/out/rollout_speed.json.

    .venv/bin/python benchmarks/rollout_speed.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from unipo.models import build_tiny_model
from unipo.rollout import generate

NUM_PROMPTS, GROUP_SIZE, NEW_TOKENS = 8, 8, 16
OUT = Path(__file__).parent / "out" / "rollout_speed.json"


def _prompts(tokenizer) -> list[list[int]]:
    texts = [f"Question {i}: what is {7 * i + 3} + {11 * i}? Answer:" for i in range(NUM_PROMPTS)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _median_seconds(variants: dict, repeats: int) -> dict[str, float]:
    """Median wall time per variant, run round-robin so that load from other processes hits all alike."""
    for fn in variants.values():
        fn()  # warm-up: first-call allocations and kernel selection
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in seconds.items()}


def _ours(model, prompts: list[list[int]], share: bool):
    def run() -> None:
        gen = generate(model, prompts, group_size=GROUP_SIZE, max_new_tokens=NEW_TOKENS, eos_token_id=-1,
                       pad_token_id=0, generator=torch.Generator().manual_seed(0), share_prompt_cache=share)
        assert gen.completion_ids.shape == (NUM_PROMPTS * GROUP_SIZE, NEW_TOKENS)
    return run


def _hf_generate(model, tokenizer, prompts: list[list[int]]):
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    batch = {k: v.repeat_interleave(GROUP_SIZE, dim=0) for k, v in batch.items()}

    def run() -> None:
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=True,
                           top_k=0, pad_token_id=0, eos_token_id=None)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = NUM_PROMPTS * GROUP_SIZE * NEW_TOKENS
    results: dict[str, dict[str, dict[str, float]]] = {}
    print(f"{NUM_PROMPTS} prompts x {GROUP_SIZE} completions x {NEW_TOKENS} tokens, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}")
    print(f"{'model':6} {'variant':18} {'seconds':>8} {'tokens/s':>9}")
    for size in ("tiny", "small"):
        model, tokenizer = build_tiny_model(size)
        prompts = _prompts(tokenizer)
        variants = {
            "shared_cache": _ours(model, prompts, share=True),
            "unshared_cache": _ours(model, prompts, share=False),
            "hf_model_generate": _hf_generate(model, tokenizer, prompts),
        }
        results[size] = {}
        for name, seconds in _median_seconds(variants, args.repeats).items():
            results[size][name] = {"seconds": seconds, "tokens_per_second": tokens / seconds}
            print(f"{size:6} {name:18} {seconds:8.3f} {tokens / seconds:9.0f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    meta = {"prompts": NUM_PROMPTS, "group_size": GROUP_SIZE, "new_tokens": NEW_TOKENS, "repeats": args.repeats,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine()}
    OUT.write_text(json.dumps({"config": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
