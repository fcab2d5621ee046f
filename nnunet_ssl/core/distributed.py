"""torch.distributed helpers that make a contrastive step over DDP ranks equal to one step on the whole batch.

Pure torch (no nnU-Net import). Every helper also works without an initialised process group (one process:
it returns its input), so callers need no special case.

Batches are "view-major" (see ``nnunet_ssl.nnunet.pair_loader``): with B cases and V views per case (2, plus
DrasCLR's neighbour crops), rows are [view 0 of the B cases, view 1 of the B cases, ...]. Gathering keeps that
layout for the global batch: [view 0 of rank 0's cases, view 0 of rank 1's cases, ..., view 1 of rank 0's cases,
...], which is exactly the batch one process would load if it held all cases (rank 0's first). Ranks may hold
different numbers of cases (nnU-Net gives the first ranks one more when the batch does not divide evenly).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch import distributed as dist

# batch entries holding per-crop indices that must stay unique in the global batch
_INDEX_KEYS = ("sample_index", "case_index")


def world_size() -> int:
    """Number of processes in the default group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def cases_per_rank(global_cases: int, num_ranks: int, name: str = "cases per step") -> list[int]:
    """Split a global number of cases per step over ranks as nnU-Net splits its batch size: every rank gets
    global // num_ranks and the first global % num_ranks ranks one more, so the ranks hold exactly global_cases."""
    if global_cases < num_ranks:
        raise ValueError(f"{name} = {global_cases} cannot be split over {num_ranks} DDP processes (at least one case "
                         f"each): raise it or use fewer GPUs")
    base, extra = divmod(int(global_cases), int(num_ranks))
    return [base + (r < extra) for r in range(num_ranks)]


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    local = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(sizes, local)
    return [int(s) for s in sizes]


def all_gather_with_grad(x: Tensor, rows_per_rank: Sequence[int] | None = None) -> list[Tensor]:
    """All ranks' ``x`` (leading dimensions may differ), as a list indexed by rank.

    The local entry is ``x`` itself with its autograd graph; the others are constants. A loss computed from the
    gathered rows on every rank therefore sends each rank the gradient for its own rows only, and the sum over
    ranks of those gradients is the gradient of the loss (what DDP's all-reduce forms, up to its 1/world_size).
    ``rows_per_rank`` (leading dimension on each rank) saves one collective when the caller knows it."""
    if world_size() == 1:
        return [x]
    if rows_per_rank is None:
        rows_per_rank = _gather_sizes(x.shape[0], x.device)
    longest = max(rows_per_rank)
    # bool is not a collective type on every backend
    send = x.detach().to(torch.uint8) if x.dtype == torch.bool else x.detach()
    if x.shape[0] < longest:  # all_gather needs equal shapes: pad, then cut each rank's part back out
        send = torch.cat((send, send.new_zeros((longest - x.shape[0], *x.shape[1:]))))
    send = send.contiguous()  # collectives need dense row-major buffers (dense maps may be channels-last)
    buffers = [torch.empty_like(send) for _ in rows_per_rank]
    if send.numel() > 0:
        dist.all_gather(buffers, send)
    parts = [b[:n].to(x.dtype) for b, n in zip(buffers, rows_per_rank)]
    parts[rank()] = x
    return parts


def view_major_index(cases: Sequence[int], views: int) -> Tensor:
    """Permutation from the rank-major concatenation of all ranks' view-major rows to the global view-major order.

    Rank r holds ``views * cases[r]`` rows; the result has one entry per global row (view v, rank r, case j)
    pointing at that row in the rank-major concatenation."""
    n = torch.as_tensor(list(cases), dtype=torch.long)
    rank_start = torch.cumsum(views * n, 0) - views * n
    block_start = (rank_start[None, :] + torch.arange(views)[:, None] * n[None, :]).flatten()  # (views * ranks,)
    block_len = n.repeat(views)
    total = int(block_len.sum())
    within_block = torch.arange(total) - torch.repeat_interleave(torch.cumsum(block_len, 0) - block_len, block_len)
    return torch.repeat_interleave(block_start, block_len) + within_block


def gather_view_major(x: Tensor, views: int, cases: Sequence[int] | None = None) -> Tensor:
    """All ranks' view-major rows of ``x`` as one global view-major tensor; gradients reach the local rows.

    ``cases`` (cases on each rank) saves one collective when known."""
    if world_size() == 1:
        return x
    if x.shape[0] % views:
        raise ValueError(f"{x.shape[0]} rows are not {views} views of the same cases")
    if cases is None:
        cases = [n // views for n in _gather_sizes(x.shape[0], x.device)]
    parts = all_gather_with_grad(x, [views * c for c in cases])
    return torch.cat(parts)[view_major_index(cases, views).to(x.device)]


def _global_indices(x: Tensor, key: str, cases: Sequence[int]) -> Tensor:
    """Local sample/case indices -> indices of the single-process global batch.

    The loader numbers crops block by block: view crops 0..B-1, neighbour crops B*(k+1) + case; case_index is
    the case 0..B-1. In the global batch the blocks are G = sum(cases) long and rank r's cases start at
    sum(cases[:r])."""
    r = rank()
    offset = sum(cases[:r])
    if key == "case_index":
        return x + offset
    return torch.div(x, cases[r], rounding_mode="floor") * sum(cases) + offset + x % cases[r]


def gather_global_batch(outputs: dict[str, Tensor], batch: dict, views: int, skip: Iterable[str] = ("data",)
                        ) -> tuple[dict[str, Tensor], dict]:
    """Head outputs and loader batch of all ranks, as one process holding the whole batch would have them.

    * outputs: every tensor is gathered view-major with gradients to the local rows (detached inputs, e.g.
      momentum-key outputs, stay constants);
    * batch: per-row tensors view-major, per-case tensors (leading dimension B, e.g. ``overlap``) rank-major,
      ``keys`` (case ids) with all_gather_object; ``sample_index`` / ``case_index`` are renumbered so they stay
      unique. Tensors keep their device and dtype. Entries in ``skip`` (the image data: the loss never reads it)
      are left out. Needs ``sample_index`` (rows) and ``keys`` (one per case)."""
    n_rows = int(batch["sample_index"].shape[0])
    n_cases = len(batch["keys"])
    if n_rows != views * n_cases:
        raise ValueError(f"batch has {n_rows} rows for {n_cases} cases: expected {views} views per case")
    if world_size() == 1:
        return outputs, {k: v for k, v in batch.items() if k not in set(skip)}
    ref = next(iter(outputs.values()))
    comm_device = ref.device  # NCCL only moves CUDA tensors; the heads' outputs live where the backend works
    cases = [n // views for n in _gather_sizes(n_rows, comm_device)]

    gathered_outputs = {k: gather_view_major(v, views, cases) for k, v in outputs.items()}
    gathered = {}
    for key, value in batch.items():
        if key in set(skip):
            continue
        if isinstance(value, (list, tuple)) and len(value) == n_cases:
            per_rank = [None] * world_size()
            dist.all_gather_object(per_rank, list(value))
            gathered[key] = [item for part in per_rank for item in part]
        elif isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] in (n_rows, n_cases):
            local = value.to(comm_device)
            if value.shape[0] == n_rows:
                if key in _INDEX_KEYS:
                    local = _global_indices(local, key, cases)
                out = gather_view_major(local, views, cases)
            else:
                out = torch.cat(all_gather_with_grad(local, cases))
            gathered[key] = out.to(value.device)
        else:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"cannot gather batch entry {key!r} ({shape}): expected a tensor with {n_rows} rows or "
                             f"{n_cases} cases, or a list with one item per case")
    return gathered_outputs, gathered


def shared_seed(device: torch.device) -> int:
    """A random seed that is the same on every rank (rank 0's draw), for sampling that must agree across ranks."""
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.long).to(device)
    if world_size() > 1:
        dist.broadcast(seed, src=0)
    return int(seed)


def _by_dtype(tensors: Sequence[Tensor]) -> dict[torch.dtype, list[Tensor]]:
    groups: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return groups


@torch.no_grad()
def broadcast_parameters_(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (what DDP does for the module it
    wraps; needed for trainable parts outside it). One collective per dtype."""
    if world_size() == 1:
        return
    for group in _by_dtype([t for t in list(module.parameters()) + list(module.buffers())]).values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src=src)
        for t, chunk in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(chunk.view_as(t))


@torch.no_grad()
def average_gradients_(parameters: Iterable[nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks (DDP's all-reduce, for parameters outside the DDP module).

    A missing gradient counts as zero, so every rank sends the same sizes."""
    if world_size() == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for group in _by_dtype([p.grad for p in params]).values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat /= world_size()
        for g, chunk in zip(group, flat.split([g.numel() for g in group])):
            g.copy_(chunk.view_as(g))
