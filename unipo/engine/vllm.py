"""The vLLM engine: a vLLM `LLM` in the trainer's own process (colocated), fed the trainer's weights.

Built from the trainer's model without a copy on disk: the model's config goes into a temporary folder, vLLM
starts on it with placeholder weights (`load_format="dummy"`, no tokenizer: prompts and completions are token
ids), and `sync` pushes the trainer's weights in place through vLLM's in-process reload (`collective_rpc(
"reload_weights", ...)`, then `reset_prefix_cache()` so no cached prompt keys of old weights are reused).
The trainer pushes after every step that changed the policy; the cost is in `last_sync_seconds`.

Each completion is one request with its own sampling seed drawn from the trainer's torch generator, so a run is
reproducible on one machine. The log-probs returned are vLLM's `processed_logprobs`: log_softmax(logits / T) of
the sampled token, renormalised over the nucleus when top_p < 1 (unipo's native sampler records the full tempered
softmax instead; docs/vllm.md). They are never used as pi_old (`logp_exact = False`).

vLLM changes process-wide state when it runs in-process; this module undoes it:
- its CPU worker replaces `torch.set_num_threads` with a no-op and serves at one thread: torch's own function
  and the trainer's thread count are restored after every call into vLLM;
- it seeds Python's, NumPy's and torch's global generators at start, and its sampler draws from torch's global
  generator even for seeded requests: their states are put back after every call;
- it initialises `torch.distributed` (a one-process gloo group) when nothing had: `close` destroys it again.
On CPU, chunked prefill is off: with it, a seeded request whose prompt is split across scheduler steps crashes
vLLM 0.32's CPU runner ("CPU Generator does not use offset"; tests_vllm has the case).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import shutil
import tempfile
import time

import torch

from unipo.models import context_length
from unipo.rollout import Generation, NonFiniteLogitsError, _check_generate_args, left_pad, pad_sequences

_GIB = 1 << 30


@contextlib.contextmanager
def _torch_threads_kept():
    """Whatever vLLM does to torch's intra-op threads inside, the caller's count and torch's own
    `set_num_threads` are back afterwards."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = torch._C.set_num_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@contextlib.contextmanager
def _random_state_kept(device: torch.device):
    """vLLM seeds Python's, NumPy's and torch's global generators when it starts in-process, and its sampler draws
    from torch's even for seeded requests: put them back, so the trainer's streams do not depend on the engine."""
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


class _QuietKnownWarnings(logging.Filter):
    """vLLM warnings that say nothing here: its in-place reload warns "RotaryEmbedding: Failed to load weights"
    for every layer at every push (the rotary tables are computed, not loaded, and it keeps them as they were: the
    tests check the outputs); without a tokenizer its chat-template warm-up fails (we never chat through it); its
    no-op `torch.set_num_threads` complains when called (we put torch's own back)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rotary = record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",)
        threads = record.msg.startswith("CPU backend doesn't allow to use `torch.set_num_threads`")
        return not (rotary or threads or record.msg == "Chat template warmup failed")


class VLLMEngine:
    logp_exact = False  # other kernels than the trainer's forward: pi_old comes from the trainer's own pass

    def __init__(self, model: torch.nn.Module, *, kv_cache_gib: float = 1.0,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.3, seed: int = 0,
                 device: torch.device | None = None) -> None:
        module = getattr(model, "module", model)  # a DDP wrapper's model
        device = device or next(module.parameters()).device
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"rollout.engine=vllm runs on CUDA or CPU, not {device.type}")
        self.device = device
        self.dtype = next(module.parameters()).dtype
        self.vocab_size = module.config.vocab_size
        context = context_length(module)
        self.max_model_len = max_model_len or context
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: the weight push passes tensors directly
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        for name in ("vllm.model_executor.model_loader.reload.layerwise", "vllm.renderers.base",
                     "vllm.v1.worker.cpu_worker"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _QuietKnownWarnings) for f in logger.filters):
                logger.addFilter(_QuietKnownWarnings())
        self._folder = tempfile.mkdtemp(prefix="unipo-vllm-")
        hf_config = copy.deepcopy(module.config)
        hf_config.architectures = [type(module).__name__]
        hf_config.save_pretrained(self._folder)
        self._owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        started = time.perf_counter()
        try:
            with _torch_threads_kept(), _random_state_kept(device):
                self.llm = LLM(
                    model=self._folder, skip_tokenizer_init=True, load_format="dummy", dtype=self.dtype,
                    seed=seed, distributed_executor_backend="uni", kv_cache_memory_bytes=int(kv_cache_gib * _GIB),
                    gpu_memory_utilization=gpu_memory_utilization, max_model_len=self.max_model_len,
                    logprobs_mode="processed_logprobs", generation_config="vllm", enable_prefix_caching=True,
                    # On CPU a seeded request cut by chunked prefill crashes vLLM's runner: it rewinds the request's
                    # generator offset, which CPU generators lack ("CPU Generator does not use offset").
                    enable_chunked_prefill=device.type == "cuda",
                    enforce_eager=device.type == "cpu", disable_log_stats=True)
        except BaseException:
            self.llm = None
            self.close()
            raise
        self.start_seconds = time.perf_counter() - started
        self.last_sync_seconds = 0.0
        self.sync(model)

    @classmethod
    def from_config(cls, config, model: torch.nn.Module, tokenizer, device: torch.device) -> VLLMEngine:
        r = config.rollout
        return cls(model, kv_cache_gib=r.vllm_kv_cache_gib, max_model_len=r.vllm_max_model_len,
                   gpu_memory_utilization=r.vllm_gpu_memory_utilization, seed=config.seed, device=device)

    # -- weights ---------------------------------------------------------------------------
    @torch.no_grad()
    def sync(self, model: torch.nn.Module) -> None:
        """Copy `model`'s weights (checkpoint names, as `state_dict` gives them) into vLLM's model in place."""
        started = time.perf_counter()
        module = getattr(model, "module", model)
        weights = [(name, tensor.detach()) for name, tensor in module.state_dict().items()]
        with _torch_threads_kept():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
            self.llm.reset_prefix_cache()
        self.last_sync_seconds = time.perf_counter() - started

    # -- sampling --------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], *, group_size: int, max_new_tokens: int, eos_token_id: int,
                 pad_token_id: int, temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, greedy: bool = False) -> Generation:
        """`unipo.rollout.generate`'s contract on vLLM: G completions per prompt, one request each, stopping at
        `eos_token_id` (kept, masked in) or after `max_new_tokens` (truncated). Greedy decoding records the
        log-probs at temperature 1, as the native sampler does."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        _check_generate_args(prompts, group_size, max_new_tokens, temperature, top_p, greedy)
        longest = max(len(p) for p in prompts)
        if self.max_model_len is not None and longest + max_new_tokens > self.max_model_len:
            raise ValueError(f"a prompt of {longest} tokens plus {max_new_tokens} new ones does not fit vLLM's "
                             f"{self.max_model_len} positions (rollout.vllm_max_model_len or the model's context)")
        rows = [list(p) for p in prompts for _ in range(group_size)]
        seeds = [None] * len(rows)
        if generator is not None:  # one seed per completion, from the trainer's stream: reproducible runs
            seeds = torch.randint(0, 2**62, (len(rows),), generator=generator, device=generator.device).tolist()
        stop = [eos_token_id] if 0 <= eos_token_id < self.vocab_size else []  # e.g. -1: never stop, as native
        params = [SamplingParams(n=1, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                                 max_tokens=max_new_tokens, logprobs=0, seed=seed, stop_token_ids=stop,
                                 detokenize=False, skip_special_tokens=False) for seed in seeds]
        with _torch_threads_kept(), _random_state_kept(self.device):  # its sampler also draws from the global one
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=row) for row in rows], params, use_tqdm=False)
        completions, logps = [], []
        for output in outputs:
            sample = output.outputs[0]
            ids = list(sample.token_ids)
            completions.append(ids)
            logps.append([step[token].logprob for token, step in zip(ids, sample.logprobs)])
        prompt_ids, prompt_mask = left_pad(rows, pad_token_id, self.device)
        completion_ids, completion_mask = pad_sequences(completions, pad_token_id, left=False, device=self.device)
        sampling_logp = torch.zeros(completion_ids.shape, dtype=torch.float32)
        for row, values in enumerate(logps):
            sampling_logp[row, :len(values)] = torch.tensor(values, dtype=torch.float32)
        if bool(sampling_logp.isnan().any()):
            raise NonFiniteLogitsError()
        truncated = torch.tensor([not ids or ids[-1] != eos_token_id for ids in completions], device=self.device)
        return Generation(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                          completion_mask=completion_mask, sampling_logp=sampling_logp.to(self.device),
                          truncated=truncated)

    # -- end -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop vLLM's engine, free its KV cache, and undo its process-wide state (its process group)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            with _torch_threads_kept():
                with contextlib.suppress(Exception):
                    llm.llm_engine.engine_core.shutdown()
                del llm
                gc.collect()
                from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

                destroy_model_parallel()
                if self._owns_process_group:
                    destroy_distributed_environment()
        shutil.rmtree(getattr(self, "_folder", ""), ignore_errors=True)
