"""Multi-process training on torch.distributed: data parallel (DDP) and fully sharded (FSDP2).

Launch N processes with torchrun (`torchrun --nproc_per_node N -m unipo train ...`, or `unipo train --nproc N`);
each process is one rank. The design keeps N processes exactly equal to one process on the same rows:

- **Whole groups on one rank.** Each rank generates and scores its share of the step's prompts (prompt i goes
  to rank i mod N), so every advantage group lives on one rank.
- **One global batch.** The ranks' batches are then all-gathered (`gather_batch`): every rank holds the same
  global batch, and every slot function (advantages, mixer, selection, SPO's tracker) runs on it exactly as in one
  process. Batch-wide statistics (REINFORCE++'s batch std, the 80/20 top-entropy quota, CPPO's batch scope,
  dynamic-sampling counts) therefore need no special care: they *are* global.
- **Forwards on local rows only.** The expensive parts (the no-grad passes for pi_old, entropy, values and the
  reference; the loss forwards and backwards) run on each rank's own rows. Per-row results of the no-grad
  passes are summed into the global batch (`fill_rows`). In the update every normaliser (the token count of a
  token-mean, the rows of a sequence-mean, rows x T_max) is the *global* mini-batch's, so the ranks' gradients
  add up to the one-process gradient; DDP and FSDP average gradients over ranks, so each rank's loss is scaled
  by N (`loss_scale`).
- **Equal collective counts.** FSDP all-gathers parameters in every forward, and DDP all-reduces in the last
  backward of each optimizer step, so every rank runs the same number of micro-batches: a rank with fewer rows
  in a mini-batch runs zero-weighted ones (`micro_batches`). Generation and evaluation run on unsharded weights
  (`full_weights`), where ranks may decode different numbers of tokens.

Rank 0 writes the logs and checkpoints. Checkpoints are always full (an HF model folder and the optimizer state
in its single-process layout), so a run saved at any N resumes at any N.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Parallel:
    """Where this process stands in a run: its rank, the world size and the data-parallel mode."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "ddp"  # ddp | fsdp (with world_size 1 nothing is wrapped)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.active and self.mode == "fsdp"

    @property
    def loss_scale(self) -> float:
        """DDP and FSDP average the ranks' gradients; the ranks' losses are shares of one global loss, so
        each is scaled by N to make the average their sum."""
        return float(self.world_size)

    # -- set-up ------------------------------------------------------------------------------
    def device(self, requested: torch.device) -> torch.device:
        """The rank's device: its own GPU (LOCAL_RANK) when the run is on CUDA."""
        if self.active and requested.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return requested

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """`model` made data parallel in place (FSDP2 shards it; DDP wraps a forward module around it, see
        `PolicyForward`). Weights are first broadcast from rank 0, so every rank starts from the same ones."""
        if not self.active:
            return PolicyForward(model)
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(tensor.data, src=0)
        if self.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (self.world_size,))
            # One FSDP unit per decoder layer and one for the rest (embeddings, final norm, head): a layer's
            # weights are whole only while that layer runs.
            for layer in decoder_layers(model):
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return PolicyForward(model)
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(PolicyForward(model), device_ids=ids)

    # -- the update --------------------------------------------------------------------------
    def sync_gradients(self, forward_module: nn.Module, last: bool):
        """DDP all-reduces only in the last backward of an optimizer step (the others accumulate locally)."""
        if self.active and not last and hasattr(forward_module, "no_sync"):
            return forward_module.no_sync()
        return nullcontext()

    def micro_batches(self, rows: torch.Tensor, origin: torch.Tensor | None, size: int, *,
                      equal_counts: bool = True) -> list[tuple[torch.Tensor, bool]]:
        """This rank's micro-batches of the global rows `rows` as (rows, real): its own rows in chunks of `size`;
        with `equal_counts`, padded with chunks to ignore (`real` False: their loss is multiplied by 0) to the
        largest count any rank has, so that every rank runs the same number of forwards and backwards (FSDP
        gathers weights in each forward; DDP reduces in the last backward). `origin[i]`: the rank holding row i."""
        if origin is None or not self.active:  # one process: every row is this one's
            return [(part, True) for part in rows.split(size) if len(part)]
        mine = rows[origin[rows] == self.rank]
        chunks = [(part, True) for part in mine.split(size) if len(part)]  # (an empty tensor splits into one)
        if not equal_counts:
            return chunks
        counts = torch.bincount(origin[rows], minlength=self.world_size)
        most = int(((counts + size - 1) // size).max())
        filler = rows[:1]  # any row: its loss is multiplied by 0
        return chunks + [(filler, False)] * (most - len(chunks))

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return tensor

    def average_gradients(self, parameters: list[nn.Parameter]) -> None:
        """Average the gradients of parameters outside the DDP/FSDP module (the value head) over ranks."""
        if not self.active or not parameters:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.all_reduce_(flat)
        flat /= self.world_size
        for p, part in zip(parameters, flat.split([g.numel() for g in grads])):
            p.grad = part.view_as(p).clone()

    def fill_rows(self, local_values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
        """The global [n_rows, ...] tensor of per-row values each rank computed for its own `rows`."""
        full = local_values.new_zeros((n_rows, *local_values.shape[1:]))
        full[rows] = local_values
        return self.all_reduce_(full)

    @contextmanager
    def full_weights(self, model: nn.Module) -> Iterator[None]:
        """FSDP: every layer's weights whole for the duration (generation, evaluation), so ranks may run
        different numbers of forwards; no-op otherwise."""
        if not self.fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
            unit.set_reshard_after_forward(False)
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(True)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def main_first(self, action):
        """`action()` on rank 0 only, its result returned there (None elsewhere). If it raised, rank 0 raises it
        and every other rank exits quietly (rank 0 prints the one error line), so no rank waits forever on a run
        that will not start."""
        if not self.active:
            return action()
        import torch.distributed as dist

        result, error = None, None
        if self.is_main:
            try:
                result = action()
            except BaseException as raised:  # re-raised below, after the others know
                error = raised
        failed = torch.tensor([error is not None], dtype=torch.uint8)
        dist.broadcast(failed, src=0)
        if error is not None:
            raise error
        if bool(failed):
            raise SystemExit(1)
        return result

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (for small results such as an evaluation's numbers)."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)  # between our own ranks: values rank 0 computed, not read from disk
        return box[0]

    # -- checkpoints ---------------------------------------------------------------------------
    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0's CPU (FSDP gathers the shards; a collective: every rank calls)."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def full_optimizer_state(self, model: nn.Module, optimizer) -> dict[str, Any]:
        """The optimizer's state in the single-process layout (parameters numbered in order), on every rank for
        DDP and on rank 0 for FSDP (gathered from the shards: a collective)."""
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        named = get_optimizer_state_dict(model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return {}
        names = parameter_names(model)
        number = {name: i for i, name in enumerate(names)}
        return {"state": {number[name]: value for name, value in named["state"].items()},
                "param_groups": [{**group, "params": [number[name] for name in group["params"]]}
                                 for group in named["param_groups"]]}

    def load_optimizer_state(self, model: nn.Module, optimizer, state: dict[str, Any]) -> None:
        """Load a single-process optimizer state (every rank read it from the checkpoint)."""
        if not self.fsdp:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = parameter_names(model)
        named = {"state": {names[int(i)]: value for i, value in state["state"].items()},
                 "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                                  for group in state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def parameter_names(model: nn.Module) -> list[str]:
    """Trainable parameters' names in `model.parameters()` order (the optimizer's numbering)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of an HF causal LM (the FSDP units), found the way HF names them."""
    for path in ("model.layers", "base_model.model.model.layers", "transformer.h", "gpt_neox.layers"):
        node: Any = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList):
            return list(node)
    return []


class PolicyForward(nn.Module):
    """The training forward as a module (`unipo.rollout.policy_logprobs` of the wrapped causal LM), so that DDP
    can wrap it: DDP needs the forward that produces the loss to run through its own `forward`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.policy = model

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask, *, temperature: float,
                need_entropy: bool, return_hidden: bool):
        from unipo.rollout import policy_logprobs

        return policy_logprobs(self.policy, prompt_ids, prompt_mask, completion_ids, completion_mask,
                               temperature=temperature, need_entropy=need_entropy, return_hidden=return_hidden)


# -- process group -------------------------------------------------------------------------------
def from_environment(mode: str) -> Parallel:
    """This process's `Parallel`, starting the process group when torchrun launched it (WORLD_SIZE > 1):
    NCCL when CUDA is available, else gloo. Multi-node runs use torchrun's own rendezvous (its --nnodes,
    --rdzv-endpoint); nothing here differs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Parallel(mode=mode)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Parallel(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, mode=mode)


def shutdown(*holders: Any) -> None:
    """End the process group cleanly. The modules holding DDP state are dropped and collected first: gloo can
    otherwise hang at exit in DDP's destructor."""
    import torch.distributed as dist

    for holder in holders:
        for name in ("forward_module", "model", "reference", "optimizer"):
            if hasattr(holder, name):
                setattr(holder, name, None)
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# -- the global batch ------------------------------------------------------------------------------
def gather_batch(batch, parallel: Parallel):
    """Every rank's `RolloutBatch` concatenated in rank order (prompts renumbered so that each rank's prompts
    follow the previous rank's, and so are a multi-turn batch's episodes and search trees: each rank numbers its own
    from 0), on every rank; and `origin`, the rank that holds each row."""
    from unipo.collect import RolloutBatch

    if not parallel.active:
        return batch, torch.zeros(len(batch), dtype=torch.long, device=batch.rewards.device)

    def count(ids: torch.Tensor | None) -> int:
        return int(ids.max()) + 1 if ids is not None and len(ids) else 0

    renumbered = ("prompt_index", "episode_ids", "tree_ids")  # rank-local ids, offset by the previous ranks' counts
    sizes = _all_gather_ints([len(batch), *(count(getattr(batch, name)) for name in renumbered),
                              batch.reward_errors, batch.reward_timeouts], parallel)
    parts: list[dict[str, Any]] = [{} for _ in range(parallel.world_size)]
    for f in fields(RolloutBatch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            pieces = _all_gather_rows(value, sizes[:, 0], parallel, left=f.name in ("prompt_ids", "prompt_mask"))
        elif isinstance(value, list):
            pieces = _all_gather_strings(value, sizes[:, 0], parallel)
        else:
            continue
        for rank, piece in enumerate(pieces):
            parts[rank][f.name] = piece
    offsets = [0] * len(renumbered)
    batches = []
    for rank, part in enumerate(parts):
        for k, name in enumerate(renumbered):
            if part.get(name) is not None:
                part[name] = part[name] + offsets[k]
            offsets[k] += int(sizes[rank, 1 + k])
        index = part["prompt_index"]
        private = part["group_ids"] < 0  # expert rows outside the rollouts' group keep their own negative id
        part["group_ids"] = torch.where(private, -(index + 1), index)
        batches.append(RolloutBatch(**part, reward_errors=int(sizes[rank, 4]), reward_timeouts=int(sizes[rank, 5])))
    origin = torch.cat([torch.full((int(n),), rank, dtype=torch.long) for rank, n in enumerate(sizes[:, 0])])
    nonempty = [b for b in batches if len(b)]
    merged = RolloutBatch.concat(nonempty) if nonempty else batch
    merged.reward_errors = sum(b.reward_errors for b in batches)
    merged.reward_timeouts = sum(b.reward_timeouts for b in batches)
    return merged, origin.to(batch.rewards.device)


def _all_gather_ints(values: list[int], parallel: Parallel) -> torch.Tensor:
    import torch.distributed as dist

    mine = torch.tensor(values, dtype=torch.long)
    out = [torch.zeros_like(mine) for _ in range(parallel.world_size)]
    dist.all_gather(out, mine)
    return torch.stack(out)


def _all_gather_rows(value: torch.Tensor, rows: torch.Tensor, parallel: Parallel, *, left: bool) -> list[torch.Tensor]:
    """Each rank's [rows_r, ...] tensor, padded to common shapes for the collective and cut back after (2-D
    tensors are padded on the left for prompts, on the right otherwise)."""
    import torch.distributed as dist

    shape = torch.tensor([value.dim(), *value.shape, *([0] * (2 - value.dim()))][:3], dtype=torch.long)
    shapes = [torch.zeros_like(shape) for _ in range(parallel.world_size)]
    dist.all_gather(shapes, shape)
    width = max(int(s[2]) for s in shapes) if value.dim() == 2 else 0
    most = int(rows.max())
    padded = value.new_zeros((most, width) if value.dim() == 2 else (most,))
    if value.dim() == 2:
        columns = slice(width - value.shape[1], width) if left else slice(0, value.shape[1])
        padded[: value.shape[0], columns] = value
    else:
        padded[: value.shape[0]] = value
    out = [torch.zeros_like(padded) for _ in range(parallel.world_size)]
    dist.all_gather(out, padded.contiguous())
    return [piece[: int(n)] for piece, n in zip(out, rows)]


def _all_gather_strings(values: list[str], rows: torch.Tensor, parallel: Parallel) -> list[list[str]]:
    """Strings as UTF-8 bytes in a uint8 tensor with their lengths (no pickling between ranks)."""
    data = [s.encode("utf-8") for s in values]
    lengths = torch.tensor([len(d) for d in data], dtype=torch.long)
    joined = b"".join(data)
    flat = torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else torch.zeros(0, dtype=torch.uint8)
    all_lengths = _all_gather_rows(lengths, rows, parallel, left=False)
    totals = torch.stack([ls.sum() for ls in all_lengths])
    width = int(totals.max()) if len(totals) else 0
    blobs = _all_gather_rows(_pad_1d(flat, width)[None], torch.ones(parallel.world_size, dtype=torch.long),
                             parallel, left=False)
    out = []
    for blob, ls in zip(blobs, all_lengths):
        raw, start, strings = bytes(blob[0].tolist()), 0, []
        for n in ls.tolist():
            strings.append(raw[start:start + n].decode("utf-8"))
            start += n
        out.append(strings)
    return out


def _pad_1d(t: torch.Tensor, width: int) -> torch.Tensor:
    out = t.new_zeros(max(width, 1))
    out[: t.numel()] = t
    return out
