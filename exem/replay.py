"""ReplayBuffer: the pool of past generated patches a CycleGAN discriminator is shown (CycleGAN's ImagePool)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["RANK_POOLS_KEY", "ReplayBuffer", "load_rank_pools", "save_rank_pools"]

log = logging.getLogger(__name__)


class ReplayBuffer(nn.Module):
    """A pool of past generated patches shown to a discriminator (CycleGAN's image pool).

    With probability ½ a new fake replaces a random stored one and the stored one is returned instead. Size 0
    disables the pool (fakes pass through). The pool is a buffer, so it is saved in checkpoints.
    """

    def __init__(self, size: int = 0) -> None:
        super().__init__()
        if size < 0:
            raise ValueError(f"replay buffer size must be >= 0, got {size}")
        self.size = int(size)
        self.register_buffer("images", torch.empty(0), persistent=True)
        self.register_buffer("count", torch.zeros((), dtype=torch.long), persistent=True)
        # Host copy of ``count``: reading the buffer on a GPU would wait for the device at every sample.
        self._filled: int | None = 0

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "images"
        if key in state_dict:  # the stored pool may have a different shape than the empty placeholder
            self.images = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._filled = None  # re-read from the loaded buffer at the next call

    @torch.no_grad()
    def forward(self, fakes: Tensor) -> Tensor:
        """Return a batch of the same shape as ``fakes`` (``(B, 1, Z, Y, X)``), partly drawn from the pool."""
        if self.size == 0:
            return fakes
        fakes = fakes.detach()
        if self.images.numel() == 0 or self.images.shape[1:] != fakes.shape[1:]:
            self.images = fakes.new_zeros((self.size, *fakes.shape[1:]))
            self.count.zero_()
            self._filled = 0
        if self._filled is None:
            self._filled = int(self.count)  # once after loading a checkpoint
        out = []
        for f in fakes:
            n = self._filled
            if n < self.size:
                self.images[n] = f
                self.count += 1
                self._filled = n + 1
                out.append(f)
            elif torch.rand(()) < 0.5:
                j = int(torch.randint(self.size, ()))
                out.append(self.images[j].clone())
                self.images[j] = f
            else:
                out.append(f)
        return torch.stack(out)


# Under DDP, every rank's pools in the checkpoint: {pool name: (ranks, size, 1, Z, Y, X) tensor}.
RANK_POOLS_KEY = "exem_replay_pools"


def save_rank_pools(
    checkpoint: dict[str, Any], pools: dict[str, ReplayBuffer], strategy: Any, world: int
) -> None:
    """Put every rank's pools into ``checkpoint`` (a collective: under DDP Lightning builds the checkpoint on every
    rank and writes rank 0's). The model's state dict holds only rank 0's pools, so without this a resume would
    give every rank rank 0's pool, and a resumed run would differ from the uninterrupted one.

    Args:
        checkpoint: the checkpoint being built (``on_save_checkpoint``).
        pools: the module's pools by their state-dict prefix (``{"pool_A": ..., "pool_B": ...}``).
        strategy: the Lightning strategy (``all_gather``).
        world: number of ranks; nothing is done for 1, or for empty pools (size 0 or not filled yet).
    """
    if world <= 1 or not any(p.size and p.images.numel() for p in pools.values()):
        return
    checkpoint[RANK_POOLS_KEY] = {  # the same pools are filled on every rank (the same batches)
        name: strategy.all_gather(pool.images.contiguous()).detach().cpu()
        for name, pool in pools.items()
        if pool.size and pool.images.numel()
    }


def load_rank_pools(checkpoint: dict[str, Any], rank: int, world: int) -> None:
    """Replace the pools in ``checkpoint``'s state dict (rank 0's) with this rank's from
    :func:`save_rank_pools` (``on_load_checkpoint``, before Lightning loads the state dict). A run with another
    number of ranks takes the pool of rank ``rank % saved ranks``, with a warning: it cannot continue the saved run
    exactly."""
    saved = checkpoint.get(RANK_POOLS_KEY)
    state = checkpoint.get("state_dict")
    if not saved or state is None:
        return
    ranks = next(iter(saved.values())).shape[0]
    if ranks != world and rank == 0:
        log.warning(
            "the checkpoint's replay pools come from %d ranks and this run has %d: each rank starts from rank"
            " (its rank mod %d)'s pool, so the run does not continue the saved one exactly",
            ranks,
            world,
            ranks,
        )
    for name, stacked in saved.items():
        state[f"{name}.images"] = stacked[rank % ranks].clone()
