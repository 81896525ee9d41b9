"""unipo's `grpo` recipe against TRL's `GRPOTrainer`, side by side, on the same work.

One GRPO step = 8 addition prompts x 8 completions x 16 new tokens, then one forward/backward over the 64 rows and
one AdamW step (beta 0, one update per generation batch, no gradient checkpointing, fp32 unless marked bf16).
Both trainers get the same random-init Qwen2 model (same seed), the same 43-character tokenizer, the same prompts
distribution, learning rate, AdamW betas, weight decay, gradient clipping and constant schedule. Every row
generates exactly 16 tokens on both sides: neither stops on EOS (TRL: generation without an EOS id and an
empty EOS list for its completion mask; unipo: the collector's EOS id set to -1, an id never sampled), and EOS
stays an ordinary token of the sampled distribution on both.

Each trainer lives in its own worker process (so each has its own peak RSS and neither's global patches touch
the other); the parent alternates single steps between them (ABAB..., order flipped every round) so machine
drift hits both alike, and reports medians. FLOP/s use nominal counts, the same for both: 2*N*(B*T) for
generation and 6*N*(B*(P+T)) for the update (N parameters, B rows, P prompt and T completion tokens), against
this machine's fp32 GEMM rate measured at the same thread count.

    .venv/bin/python benchmarks/vs_trl.py                 # full comparison + loss parity, writes RESULTS.md
    .venv/bin/python benchmarks/vs_trl.py --parity-only   # just the loss/gradient parity check
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ helpers, also when run from elsewhere

from trl_parity import parity_table, run_parity  # noqa: E402
from vs_trl_setup import (  # noqa: E402
    GROUP_SIZE, NEW_TOKENS, NUM_PROMPTS, build_model, matmul_rate, nominal_flops, training_problems,
)

RESULTS = Path(__file__).parent / "RESULTS.md"
OUT = Path(__file__).parent / "out" / "vs_trl.json"
SECTION = "## unipo vs TRL"
