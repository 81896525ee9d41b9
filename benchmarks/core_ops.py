"""Time the core maths on CPU: every registered policy loss, the aggregations, the KL
estimators, and the chunked log-softmax gather / entropy.

    python benchmarks/core_ops.py [--json out.json] [--repeats 5] [--threads N]

Losses run through `compute_policy_loss` on B=256, T=1024 float32; log-prob ops on
[16, 256, 4096] logits. Each row is the median over `--repeats` timed runs after one warm-up,
for the forward alone and for forward + backward. Results are printed as a table and written
as JSON (default benchmarks/out/core_ops.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from unipo.core.kl import KL_ESTIMATORS, kl_estimate
from unipo.core.logprobs import entropy_from_logits, selective_log_softmax
from unipo.core.losses import AGGREGATIONS, POLICY_LOSSES, aggregate, compute_policy_loss

LOSS_SHAPE = (256, 1024)
LOGITS_SHAPE = (16, 256, 4096)


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and dispatch caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _time(forward: Callable[[], torch.Tensor], leaf: torch.Tensor, repeats: int) -> tuple[float, float]:
    def forward_backward() -> None:
        leaf.grad = None
        forward().backward()

    return _median_ms(forward, repeats), _median_ms(forward_backward, repeats)


def _loss_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    B, T = LOSS_SHAPE
    old = -torch.rand(B, T, generator=g) * 3 - 0.1
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    return {
        "logp": (old + 0.1 * torch.randn(B, T, generator=g)).requires_grad_(),
        "old_logp": old,
        "advantages": torch.randn(B, generator=g),
        "mask": torch.arange(T)[None, :] < lengths[:, None],
        "ref_logp": old + 0.1 * torch.randn(B, T, generator=g),
        "entropy": torch.rand(B, T, generator=g) * 3,
        "off_policy": torch.arange(B) % 8 == 0,  # one expert trace per group of 8 (hybrid losses)
    }


# Params a loss cannot run without; everything else runs at its defaults.
REQUIRED_PARAMS = {"a_star_po": ("ref_logp",), "luffy": ("off_policy",), "rl_plus": ("off_policy",)}


def bench_losses(repeats: int) -> list[dict[str, object]]:
    x = _loss_inputs()
    rows = []
    for name in POLICY_LOSSES:
        params = {key: x[key] for key in REQUIRED_PARAMS.get(name, ())}

        def forward(name: str = name, params: dict = params) -> torch.Tensor:
            return compute_policy_loss(name, x["logp"], x["old_logp"], x["advantages"], x["mask"],
                                       "token_mean", **params)[0]

        fwd, fwd_bwd = _time(forward, x["logp"], repeats)
        rows.append({"group": "policy_loss", "name": name, "forward_ms": fwd, "forward_backward_ms": fwd_bwd})
    fwd, fwd_bwd = _time(lambda: compute_policy_loss(
        "dhpo", x["logp"], x["old_logp"], x["advantages"], x["mask"], mixing="entropy", entropy=x["entropy"])[0],
        x["logp"], repeats)
    rows.append({"group": "policy_loss", "name": "dhpo (entropy mixing)", "forward_ms": fwd,
                 "forward_backward_ms": fwd_bwd})
    return rows


def bench_aggregations_and_kl(repeats: int) -> list[dict[str, object]]:
    x = _loss_inputs()
    per_token = x["logp"]
    rows = []
    for mode in AGGREGATIONS:
        fwd, fwd_bwd = _time(lambda mode=mode: aggregate(per_token, x["mask"], mode), per_token, repeats)
        rows.append({"group": "aggregation", "name": mode, "forward_ms": fwd, "forward_backward_ms": fwd_bwd})
    for kind in KL_ESTIMATORS:
        fwd, fwd_bwd = _time(lambda kind=kind: kl_estimate(x["logp"], x["ref_logp"], kind).sum(), x["logp"], repeats)
        rows.append({"group": "kl", "name": kind, "forward_ms": fwd, "forward_backward_ms": fwd_bwd})
    return rows


def bench_logprobs(repeats: int) -> list[dict[str, object]]:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(*LOGITS_SHAPE, generator=g) * 2).requires_grad_()
    ids = torch.randint(0, LOGITS_SHAPE[-1], LOGITS_SHAPE[:2], generator=g)
    cases = {
        "selective_log_softmax": lambda: selective_log_softmax(logits, ids).sum(),
        "entropy_from_logits": lambda: entropy_from_logits(logits).sum(),
        "(torch log_softmax+gather)": lambda: torch.log_softmax(logits, -1).gather(-1, ids[..., None]).sum(),
        "(torch entropy)": lambda: -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(),
    }
    rows = []
    for name, forward in cases.items():
        fwd, fwd_bwd = _time(forward, logits, repeats)
        rows.append({"group": "logprobs", "name": name, "forward_ms": fwd, "forward_backward_ms": fwd_bwd})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "core_ops.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = bench_losses(args.repeats) + bench_aggregations_and_kl(args.repeats) + bench_logprobs(args.repeats)
    print(f"{'group':<12} {'name':<28} {'forward ms':>11} {'fwd+bwd ms':>11}")
    for row in rows:
        print(f"{row['group']:<12} {row['name']:<28} {row['forward_ms']:>11.2f} {row['forward_backward_ms']:>11.2f}")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "repeats": args.repeats, "loss_shape": LOSS_SHAPE, "logits_shape": LOGITS_SHAPE, "dtype": "float32"}
    args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
