"""The training data stream: endless batches from a pair loader, with a position to resume from."""
import torch

from .errors import TrainingError


class DataStream:
    """Endless batches from a loader, epoch after epoch, that knows its position.

    ``epoch`` is the current epoch and ``position`` the number of its batches already consumed, so
    ``DataStream(loader, epoch, position)`` continues exactly where a stream with that state was.
    A resumed epoch asks the loader to skip the consumed batches (``set_epoch(epoch, skip=position)``;
    both loaders take their batches from ``schedule()``), so they are not decoded. Batches are fetched under
    ``torch.random.fork_rng``: a DataLoader draws its base seed from the global torch RNG when its
    iterator starts, which would otherwise differ between a resumed and an uninterrupted run.
    """

    def __init__(self, loader, epoch=0, position=0):
        self.loader, self.epoch, self.position = loader, int(epoch), int(position)
        self._iterator = None

    def _start_epoch(self):
        self.loader.set_epoch(self.epoch, skip=self.position)
        if self.position and not self.loader.schedule():
            # The state was saved after the epoch's last batch: start the next epoch here,
            # because DALI refuses an empty schedule where the fallback would just stop.
            self.epoch, self.position = self.epoch + 1, 0
            return self._start_epoch()
        self._iterator = iter(self.loader)

    def next(self):
        for _ in range(2):
            if self._iterator is None:
                self._start_epoch()
            try:
                with torch.random.fork_rng(devices=[]):
                    batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.epoch, self.position = self.epoch + 1, 0
                continue
            self.position += 1
            return batch
        raise TrainingError(f"the loader gave no batch for epoch {self.epoch}")

    def close(self):
        self._iterator = None
        self.loader.set_epoch(self.loader.epoch)  # the whole schedule again for the loader's next user
