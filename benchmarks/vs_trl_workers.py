"""The two sides of `vs_trl.py`: shared set-up, and one worker process per trainer that runs a step on command.

A worker builds its model and trainer once, then answers each "step" message from the parent with the step's
timings, and exits on "stop". Only one worker computes at a time (the parent waits for each reply), so the two
never compete for the cores.
"""

from __future__ import annotations

import resource
import statistics
import time
import warnings
from multiprocessing.connection import Connection

import torch
from transformers import TrainerCallback

from unipo.models import TINY_SIZES, build_char_tokenizer

NUM_PROMPTS, GROUP_SIZE, NEW_TOKENS = 8, 8, 16
LR, BETAS, GRAD_CLIP, SEED = 1e-4, (0.9, 0.99), 1.0, 0
# 43 characters: digits, operators, space and lower-case letters (addition only uses 12 of them).
ALPHABET = "0123456789+-*=() abcdefghijklmnopqrstuvwxyz"
TASK = "addition"


def build_model(size: str, seed: int = SEED):
    """A random-init fp32 Qwen2 of shape `TINY_SIZES[size]` over the 43-char vocabulary (+3 specials)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_char_tokenizer(ALPHABET)
    config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True,
                         use_cache=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id, **TINY_SIZES[size])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).float()
    return model, tokenizer


def training_problems(n: int, seed: int = SEED):
    from unipo.tasks.base import get_task

    return get_task(TASK).sample(n, seed=seed, split="train")


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that across exec, so a spawned
    worker would report its parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reply(step: float, generation: float, tokens: float, reward: float) -> dict[str, float]:
    return {"step": step, "generation": generation, "update": step - generation, "tokens": tokens,
            "reward": reward, "rss_mb": _peak_rss_mb(), "threads": torch.get_num_threads()}


_GEMM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv", "aten::dot"}


def _category(op: str) -> str | None:
    if not op.startswith("aten::"):
        return None
    if op in _GEMM:
        return "gemm"
    if "scaled_dot_product" in op:
        return "attention"
    return "optimizer" if "adam" in op else "other ops"


def op_breakdown(profiler, wall: float) -> dict[str, float]:
    """Seconds of one profiled step by kind of operator (self CPU time of the calling thread, intra-op threads
    included), and the rest of the wall time: Python, dispatch and profiler overhead."""
    totals = {"gemm": 0.0, "attention": 0.0, "optimizer": 0.0, "other ops": 0.0}
    for event in profiler.key_averages():
        kind = _category(event.key)
        if kind:
            totals[kind] += event.self_cpu_time_total / 1e6
    totals["python & dispatch"] = max(0.0, wall - sum(totals.values()))
    return {**totals, "wall": wall}


def _profiler(record_shapes: bool = False):
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], record_shapes=record_shapes)


def _gemm_shape(op: str, shapes: list) -> tuple[int, int, int]:
    """(M, K, N) of an aten::mm / aten::addmm call from its recorded input shapes."""
    (m, k), (_, n) = (shapes[0], shapes[1]) if op == "aten::mm" else (shapes[1], shapes[2])
    return m, k, n


def _isolated_seconds(m: int, k: int, n: int, repeats: int = 30) -> float:
    """Best-case time of one [m, k] x [k, n] fp32 matmul: mean over `repeats` back-to-back calls on the same
    (cache-hot) operands, at the current thread count."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return (time.perf_counter() - started) / repeats


def step_floor(step) -> dict[str, float]:
    """How fast `step()` could be at these maths: run it once under the profiler recording shapes, then time
    every GEMM shape it ran in isolation (cache-hot: the fastest it goes on this machine) times its count.
    `gemm_isolated` is a hard lower bound for any implementation of the same work; `floor` adds the step's
    attention as it runs now (not a hard bound: attention could in principle be faster), with everything else
    (elementwise ops, sampling, the optimizer, Python) taken as free."""
    with _profiler(record_shapes=True) as profiler:
        step()
    counts: dict[tuple[int, int, int], int] = {}
    in_situ = attention = 0.0
    for event in profiler.key_averages(group_by_input_shape=True):
        if event.key in ("aten::mm", "aten::addmm"):
            shape = _gemm_shape(event.key, event.input_shapes)
            counts[shape] = counts.get(shape, 0) + event.count
            in_situ += event.self_cpu_time_total / 1e6
        elif "scaled_dot_product" in event.key:
            attention += event.self_cpu_time_total / 1e6
    isolated = sum(count * _isolated_seconds(*shape) for shape, count in counts.items())
    gflop = sum(2 * m * k * n * count for (m, k, n), count in counts.items()) / 1e9
    return {"gemm_isolated": isolated, "gemm_in_situ": in_situ, "attention": attention, "gemm_gflop": gflop,
            "floor": isolated + attention}


# ------------------------------------------------------------------------------------------------ unipo
def unipo_trainer(size: str, *, bf16: bool = False, steps: int = 1000, recipe: str = "grpo"):
    from unipo.config import OptimConfig, RolloutConfig, TrainConfig
    from unipo.recipes import get_recipe
    from unipo.trainer import Trainer

    model, tokenizer = build_model(size)
    config = TrainConfig(
        recipe=get_recipe(recipe), task=TASK, model="tiny", steps=steps, seed=SEED, device="cpu", bf16=bf16,
        rollout=RolloutConfig(prompts_per_step=NUM_PROMPTS, group_size=GROUP_SIZE, max_new_tokens=NEW_TOKENS),
        optim=OptimConfig(lr=LR, betas=BETAS, grad_clip=GRAD_CLIP, micro_batch_size=NUM_PROMPTS * GROUP_SIZE))
    trainer = Trainer(config, model=model, tokenizer=tokenizer, progress=False)
    trainer.collector.eos_id = -1  # never stop early: every row generates NEW_TOKENS tokens, as TRL's do
    return trainer


def _quiet(threads: int) -> None:
    warnings.filterwarnings("ignore")  # deprecation notices from transformers/TRL would drown the table
    torch.set_num_threads(threads)


def serve_unipo(conn: Connection, size: str, threads: int, bf16: bool) -> None:
    _quiet(threads)
    trainer = unipo_trainer(size, bf16=bf16)
    while (command := conn.recv()) in ("step", "profile", "floor"):
        if command == "floor":
            conn.send(step_floor(trainer.train_step))
            continue
        if command == "profile":
            with _profiler() as profiler:
                started = time.perf_counter()
                trainer.train_step()
            conn.send(op_breakdown(profiler, time.perf_counter() - started))
            continue
        started = time.perf_counter()
        metrics = trainer.train_step().metrics
        step = time.perf_counter() - started
        tokens = metrics["tokens_per_s"] * metrics["step_seconds"]
        conn.send(_reply(step, metrics["generation_seconds"], tokens, metrics["reward_mean"]))


# -------------------------------------------------------------------------------------------------- TRL
def _trl_reward(task):
    from unipo.tasks.base import Problem

    def addition_reward(prompts, completions, answer, **_):
        return [task.score(Problem(prompt=p, answer=a, demonstration=a), c)
                for p, c, a in zip(prompts, completions, answer)]
    return addition_reward


def trl_config(output_dir: str, max_steps: int, **overrides):
    from trl import GRPOConfig

    settings = dict(
        output_dir=output_dir, per_device_train_batch_size=NUM_PROMPTS * GROUP_SIZE, num_generations=GROUP_SIZE,
        max_completion_length=NEW_TOKENS, beta=0.0, num_iterations=1, loss_type="grpo", epsilon=0.2,
        learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=0.0, max_grad_norm=GRAD_CLIP,
        lr_scheduler_type="constant", warmup_steps=0, max_steps=max_steps, temperature=1.0, top_p=1.0, top_k=0,
        gradient_checkpointing=False, use_cpu=True, bf16=False, report_to=[], logging_steps=1,
        save_strategy="no", seed=SEED, disable_tqdm=True, dataloader_num_workers=0,
        # No EOS id for sampling: every row generates max_completion_length tokens (see serve_trl for the mask).
        generation_kwargs={"eos_token_id": None},
    )
    settings.update(overrides)
    return GRPOConfig(**settings)


def trl_trainer(size: str, output_dir: str, max_steps: int, callbacks=(), **overrides):
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOTrainer

    from unipo.tasks.base import get_task

    model, tokenizer = build_model(size)
    problems = training_problems(NUM_PROMPTS * max(max_steps, 1))
    dataset = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in problems])
    trainer = GRPOTrainer(model=model, reward_funcs=_trl_reward(get_task(TASK)),
                          args=trl_config(output_dir, max_steps, **overrides), train_dataset=dataset,
                          processing_class=tokenizer, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # the log line per step would only add noise to the output
    trainer.eos_token_ids = []  # the completion mask then keeps every generated token, as unipo's does
    return trainer


class StepOnCommand(TrainerCallback):
    """Reports each finished TRL step to the parent and blocks until told to go on.

    A step's time runs from the moment the worker resumes (so TRL's own logging and data loading between steps
    count) to `on_step_end`; generation is timed by wrapping `_generate_and_score_completions`."""

    def __init__(self, conn: Connection, trainer) -> None:
        self.conn, self.generation, self.tokens, self.profiler = conn, 0.0, 0.0, None
        self.resumed = time.perf_counter()
        generate = trainer._generate_and_score_completions

        def timed(inputs):
            started = time.perf_counter()
            out = generate(inputs)
            self.generation = time.perf_counter() - started
            self.tokens = float(out["completion_mask"].sum())
            return out
        trainer._generate_and_score_completions = timed

    def on_step_end(self, args, state, control, **kwargs):
        step = time.perf_counter() - self.resumed
        if self.profiler is not None:  # this step ran under the profiler: report its breakdown instead
            self.profiler.__exit__(None, None, None)
            self.conn.send(op_breakdown(self.profiler, step))
            self.profiler = None
        else:
            self.conn.send(_reply(step, self.generation, self.tokens, float("nan")))
        command = self.conn.recv()
        if command == "profile":
            self.profiler = _profiler()
            self.profiler.__enter__()
        elif command != "step":
            control.should_training_stop = True
        self.resumed = time.perf_counter()
        return control


def serve_trl(conn: Connection, size: str, threads: int, max_steps: int = 10_000) -> None:
    import tempfile

    _quiet(threads)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = trl_trainer(size, output_dir, max_steps)
        hook = StepOnCommand(conn, trainer)
        trainer.add_callback(hook)
        if conn.recv() == "step":
            hook.resumed = time.perf_counter()
            trainer.train()


# ------------------------------------------------------------------------------------------- bf16 effect
# 50 SFT steps take the tiny model to ~30% on sort:k=3: room to improve, and rewards that are not all 0 or 1
CURVE_TASK, CURVE_SFT_STEPS, CURVE_PROMPTS, CURVE_GROUP, CURVE_LR = "sort:k=3", 50, 16, 8, 3e-4


def _relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).norm() / reference.norm().clamp(min=1e-30))


def _warm_started_tiny_model():
    """The tiny model after a brief fp32 SFT on the curve task (the demo's recipe, twice as long)."""
    from unipo.config import OptimConfig, RolloutConfig, TrainConfig
    from unipo.models import build_tiny_model
    from unipo.recipes import get_recipe
    from unipo.trainer import Trainer

    model, tokenizer = build_tiny_model("tiny", seed=SEED)
    config = TrainConfig(recipe=get_recipe("sft"), task=CURVE_TASK, steps=CURVE_SFT_STEPS, seed=SEED, device="cpu",
                         rollout=RolloutConfig(prompts_per_step=256, group_size=1),
                         optim=OptimConfig(lr=2e-3, micro_batch_size=512, warmup_steps=10))
    Trainer(config, model=model, tokenizer=tokenizer, progress=False).fit()
    return model, tokenizer


def _reward_curve(model, tokenizer, steps: int, bf16: bool) -> tuple[list[float], float]:
    from unipo.config import OptimConfig, RolloutConfig, TrainConfig
    from unipo.recipes import get_recipe
    from unipo.trainer import Trainer

    config = TrainConfig(recipe=get_recipe("grpo"), task=CURVE_TASK, steps=steps, seed=SEED, device="cpu", bf16=bf16,
                         rollout=RolloutConfig(prompts_per_step=CURVE_PROMPTS, group_size=CURVE_GROUP),
                         optim=OptimConfig(lr=CURVE_LR, micro_batch_size=512))
    trainer = Trainer(config, model=model, tokenizer=tokenizer, progress=False)
    history = [trainer.train_step().metrics for _ in range(steps)]
    return [m["reward_mean"] for m in history], statistics.median(m["step_seconds"] for m in history)


def bf16_effect(steps: int, block: int = 10) -> dict:
    """bf16 autocast against fp32: the loss/gradient difference on one shared batch (tiny model, grpo), and the
    reward curves of two grpo runs from the same fp32 SFT warm start and seed that differ only in `bf16`."""
    import copy

    from trl_parity import shared_batch, unipo_loss

    model, tokenizer = build_model("tiny")
    batch = shared_batch(model, tokenizer)
    fp32 = unipo_loss(copy.deepcopy(model), tokenizer, "grpo", batch)
    bf16 = unipo_loss(copy.deepcopy(model), tokenizer, "grpo", batch, bf16=True)
    names = sorted(fp32[1])
    grads = [torch.cat([g[n].flatten() for n in names]) for g in (bf16[1], fp32[1])]
    warm, tokenizer = _warm_started_tiny_model()
    curves, seconds = {}, {}
    for name in ("fp32", "bf16"):
        rewards, seconds[name] = _reward_curve(copy.deepcopy(warm), tokenizer, steps, bf16=name == "bf16")
        curves[name] = [statistics.mean(rewards[i:i + block]) for i in range(0, steps, block)]
    return {"loss_rel": abs(bf16[0] - fp32[0]) / abs(fp32[0]), "grad_rel": _relative(*grads), "task": CURVE_TASK,
            "sft_steps": CURVE_SFT_STEPS, "prompts": CURVE_PROMPTS, "group": CURVE_GROUP, "block": block,
            "blocks": [f"{i + 1}-{min(i + block, steps)}" for i in range(0, steps, block)], "curves": curves,
            "seconds": seconds, "threads": torch.get_num_threads()}
