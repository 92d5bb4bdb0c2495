"""Collectives between training workers over ``torch.distributed`` (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import torch

from diki_model import TaskStatistics

__all__ = ["all_gather_rows", "all_gather_statistics", "all_reduce_int", "all_reduce_mean", "all_reduce_sum"]


def collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    x = t.detach().to(collective_device()).clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    x /= dist.get_world_size()
    return x.to(t.device)


def all_reduce_int(value: int, op: str) -> int:
    import torch.distributed as dist

    x = torch.tensor([value], dtype=torch.int64, device=collective_device())
    ops = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}
    dist.all_reduce(x, op=ops[op])
    return int(x.item())


def all_gather_statistics(local: TaskStatistics, world: int) -> TaskStatistics:
    """Exact merge of every worker's statistics: all-gather the state dicts, merge in rank order."""
    import torch.distributed as dist

    if world == 1:
        return local
    dev = collective_device()
    state = local.state_dict()
    gathered: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    for key in sorted(state):
        tensor = state[key].to(dev).contiguous()
        # Tensors may differ in their first dimension (held-out features): gather sizes, pad, trim.
        size = torch.tensor([tensor.shape[0] if tensor.ndim else 1], dtype=torch.int64, device=dev)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        longest = max(int(s.item()) for s in sizes)
        if tensor.ndim:
            padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=dev)
            padded[: tensor.shape[0]] = tensor
        else:
            padded = tensor
        parts = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        for rank, (part, n) in enumerate(zip(parts, sizes, strict=True)):
            gathered[rank][key] = (part[: int(n.item())] if tensor.ndim else part).cpu()
    merged = TaskStatistics.from_state_dict(gathered[0])
    for rank in range(1, world):
        merged.merge(TaskStatistics.from_state_dict(gathered[rank]))
    return merged


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    x = t.detach().to(collective_device()).clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.to(t.device)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every worker's rows of ``t`` (their counts may differ), concatenated in rank order, on every worker."""
    import torch.distributed as dist

    world = dist.get_world_size()
    dev = collective_device()
    local = t.to(dev).contiguous()
    size = torch.tensor([local.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(n.item())] for p, n in zip(parts, sizes, strict=True)]).to(t.device)
