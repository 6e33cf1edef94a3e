"""Batches for the ranks: each rank's share of a dataset, and Cycle, which reads a loader for ever with
a position a checkpoint can hold."""
from torch.utils.data import DataLoader, DistributedSampler

from rlhf.distributed import rank, world_size


def make_loader(dataset, batch_size: int, collate, shuffle: bool, seed: int) -> DataLoader:
    """Each rank reads its own share; eval shares are padded by repeating a few records."""
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate)


class Cycle:
    """Batches of a loader for ever, epoch after epoch, with a position a checkpoint can hold."""

    def __init__(self, loader: DataLoader):
        self.loader, self.epoch, self.index, self.iterator = loader, 0, 0, None

    def __next__(self) -> dict:
        if self.iterator is None:
            self.loader.sampler.set_epoch(self.epoch)
            self.iterator = iter(self.loader)
            for _ in range(self.index):
                next(self.iterator)
        try:
            batch = next(self.iterator)
        except StopIteration:
            self.epoch, self.index, self.iterator = self.epoch + 1, 0, None
            return next(self)
        self.index += 1
        return batch

    def restore(self, epoch: int, index: int) -> None:
        self.epoch, self.index, self.iterator = epoch, index, None
