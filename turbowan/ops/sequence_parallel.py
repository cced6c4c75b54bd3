"""Ulysses sequence parallelism on `torch.distributed` (NCCL on GPUs, gloo on the CPU).

With W ranks each rank holds one contiguous slice of ``ceil(L / W)`` tokens (the last slices padded with zeros).
Everything that works token by token (linears, norms, modulation, RoPE, cross-attention, FFN) runs on the local
slice. Self-attention needs every token, so around it one all-to-all trades the token split for a head split:
each rank then holds the whole sequence for ``H / W`` heads, strips the padding (attention never sees a padded
key or query) and runs the unchanged per-head attention; a second all-to-all trades back.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist


def valid_world_sizes(num_heads: int) -> list[int]:
    """Rank counts a model with ``num_heads`` heads splits over: the divisors of the head count above 1."""
    return [w for w in range(2, num_heads + 1) if num_heads % w == 0]


def check_world_size(num_heads: int, world_size: int) -> None:
    if num_heads % world_size:
        sizes = ", ".join(map(str, valid_world_sizes(num_heads))) or "none"
        raise ValueError(f"sequence parallelism splits the {num_heads} attention heads evenly over the ranks, so "
                         f"{world_size} ranks do not work; use one of: {sizes}")


class SequenceSplit:
    """How a sequence of ``length`` tokens is split over the ranks of ``group``, and the collectives on it.

    Tensors are token-major: [B, L, ...] (batch first, tokens second).
    """

    def __init__(self, length: int, num_heads: int, group=None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        check_world_size(num_heads, self.world)
        self.length = length
        self.local = math.ceil(length / self.world)  # tokens per rank, padding included
        self.padded = self.local * self.world

    def _pad(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        extra = self.padded - x.shape[dim]
        if not extra:
            return x
        shape = list(x.shape)
        shape[dim] = extra
        return torch.cat([x, x.new_zeros(shape)], dim=dim)

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice of the full sequence ``x`` along ``dim`` (zero-padded to ``self.local``)."""
        return self._pad(x, dim).narrow(dim, self.rank * self.local, self.local)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, local, ...] on every rank -> the full [B, L, ...] on every rank, padding removed."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)[:, : self.length]

    def _all_to_all(self, chunks: torch.Tensor) -> torch.Tensor:
        """Send ``chunks[j]`` to rank j; returns what each rank i sent here at index i."""
        out = torch.empty_like(chunks)
        dist.all_to_all_single(out, chunks, group=self.group)
        return out

    def tokens_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, local, H, D] (this rank's tokens, all heads) -> [B, L, H/W, D] (all tokens, this rank's heads)."""
        return self.start_tokens_to_heads(x)()

    def start_tokens_to_heads(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """`tokens_to_heads` started asynchronously: the exchange runs (NCCL on its own stream) while the caller
        computes on; calling the returned function waits for it and gives the [B, L, H/W, D] result."""
        B, n, H, D = x.shape
        chunks = x.reshape(B, n, self.world, H // self.world, D).permute(2, 0, 1, 3, 4).contiguous()
        got = torch.empty_like(chunks)  # [W (token slice), B, local, H/W, D] once received
        work = dist.all_to_all_single(got, chunks, group=self.group, async_op=True)

        def finish(chunks=chunks) -> torch.Tensor:  # holds the send buffer until the exchange is done
            work.wait()
            return got.permute(1, 0, 2, 3, 4).reshape(B, self.padded, H // self.world, D)[:, : self.length]

        return finish

    def heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, H/W, D] (all tokens, this rank's heads) -> [B, local, H, D] (this rank's tokens, all heads)."""
        B, _, h, D = x.shape
        chunks = self._pad(x).reshape(B, self.world, self.local, h, D).transpose(0, 1).contiguous()
        got = self._all_to_all(chunks)  # [W (head group), B, local, H/W, D]
        return got.permute(1, 2, 0, 3, 4).reshape(B, self.local, self.world * h, D)
