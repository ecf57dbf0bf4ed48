"""The order training rows are read in, natural or maker-balanced, fixed by the seed and the epoch.

transformers' Trainer reads natural batches through a `RandomSampler`, which accelerate turns into a
`SeedableRandomSampler`: epoch e is `torch.randperm(n)` from a generator seeded with data_seed + e.
The order is therefore a function of seed and epoch, and that is what lets a resumed run (transformers
skips the batches the checkpoint already trained on) read exactly the rows an uninterrupted run reads.

`TrainDraws` keeps that property for the orders this project adds:

- balanced: n draws with replacement per epoch, row i with weight 1/count(maker of row i), so every
  maker present is equally likely on every draw. n is the number of rows, so a balanced epoch has as
  many steps as a natural one and `max_steps` means the same.
- natural with keyed draws (augmentation on): the trainer's own randperm, so turning augmentation on
  changes the pictures, not which rows come when.
- either one with `lengths` (`group_by_image_tokens`): the epoch's draws are reordered by transformers'
  `get_length_grouped_indices` (megabatches sorted by image tokens, the longest batch first). Grouping
  changes which draws share a batch, never how often a maker is drawn.

With `keyed`, the sampler yields `Draw(row, epoch, position)` instead of a row index. The picture's
augmentation is seeded by the draw (augmentation.py), so a row drawn twice is changed differently
each time, and a resumed run changes it exactly as the uninterrupted run did.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices


class Draw(NamedTuple):
    """One read of a training row: which row, in which epoch, at which place in that epoch's order."""

    row: int
    epoch: int
    position: int


def maker_weights(makers: Sequence[str]) -> torch.Tensor:
    """Per row, 1/count(its maker): each maker's rows weigh 1 in total, whatever their number."""
    counts = Counter(makers)
    return torch.tensor([1.0 / counts[maker] for maker in makers], dtype=torch.float64)


class TrainDraws(Sampler):
    """One epoch of training draws per iteration: natural (a permutation) or maker-balanced (with replacement).

    `makers`: the maker of every training row, in row order. `seed` and the epoch (`set_epoch`, called
    by the Trainer before every epoch) fix the draws. `lengths` (image tokens per row) with
    `group_size` (rows per optimizer step) groups draws of similar cost into the same batches.
    """

    def __init__(
        self,
        makers: Sequence[str],
        *,
        balanced: bool,
        seed: int,
        lengths: Sequence[int] | None = None,
        group_size: int = 1,
        keyed: bool = False,
    ):
        if not makers:
            raise ValueError("TrainDraws needs at least one training row.")
        if lengths is not None and len(lengths) != len(makers):
            raise ValueError(f"{len(lengths)} lengths for {len(makers)} training rows; give one per row.")
        self.makers = list(makers)
        self.balanced, self.seed, self.keyed = balanced, int(seed), keyed
        self.lengths = list(lengths) if lengths is not None else None
        self.group_size = group_size
        self.weights = maker_weights(self.makers) if balanced else None
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.makers)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rows(self, epoch: int) -> list[int]:
        """The row indices epoch `epoch` reads, in order."""
        generator = torch.Generator().manual_seed(self.seed + epoch)  # accelerate's seeding of natural epochs
        count = len(self.makers)
        if self.balanced:
            rows = torch.multinomial(self.weights, count, replacement=True, generator=generator).tolist()
        elif self.lengths is None:
            rows = torch.randperm(count, generator=generator).tolist()
        else:
            rows = list(range(count))  # the grouping below permutes them
        if self.lengths is not None:
            order = get_length_grouped_indices(
                [self.lengths[row] for row in rows], self.group_size, generator=generator
            )
            rows = [rows[index] for index in order]
        return rows

    def __iter__(self) -> Iterator[int] | Iterator[Draw]:
        rows = self.rows(self.epoch)
        if not self.keyed:
            return iter(rows)
        return (Draw(row, self.epoch, position) for position, row in enumerate(rows))


def trainer_draws(args, train_dataset, makers: Sequence[str], *, balanced: bool, keyed: bool) -> TrainDraws:
    """The `TrainDraws` for a Trainer with these `args` (TRL's `SFTConfig`) over `train_dataset`.

    Grouped by image tokens when the config asks for transformers' length-grouped sampler, over the
    same batches it would group (rows per device and optimizer step).
    """
    if len(makers) != len(train_dataset):
        raise ValueError(f"{len(makers)} makers for {len(train_dataset)} training rows; give one per row.")
    lengths = None
    if args.train_sampling_strategy == "group_by_length":
        lengths = [int(length) for length in train_dataset[args.length_column_name]]
    return TrainDraws(
        makers,
        balanced=balanced,
        seed=args.data_seed if args.data_seed is not None else args.seed,
        lengths=lengths,
        group_size=args.train_batch_size * args.gradient_accumulation_steps,
        keyed=keyed,
    )
