"""Progressive patch sizes: the HR patch side, and batch size, each epoch trains on.

A schedule is a list of stages ``PATCH:EPOCH`` — train on ``PATCH`` px patches from epoch
``EPOCH`` on — such as ``128:0,192:10,256:20``. The cost of an SR step grows with the patch
area, so early epochs on small patches are cheap; the last stage's patch is the run's
"final" patch, the one validation always uses so scores compare across stages.

The batch size per stage (``batch``):

- ``keep``: the same images per step in every stage; a small-patch step is cheaper and
  an epoch takes the same number of steps.
- ``pixels``: the same pixels per step: ``batch_size`` is the batch at the final patch and
  a stage with patch ``p`` takes ``batch_size * (final / p)**2`` images, capped at
  ``MAX_BATCH_GROWTH`` times ``batch_size`` (beyond that, one LR for both batch sizes trains
  too differently per image). An epoch of a small-patch stage then takes fewer steps.

The sampler's draws stay a pure function of (seed, epoch, rank) with the epoch's patch and
batch size looked up here, so a resumed run and every rank agree on them.
"""
from __future__ import annotations

from dataclasses import dataclass

BATCH_SCHEDULES = ("keep", "pixels")
MAX_BATCH_GROWTH = 4
EXAMPLE = "128:0,192:10,256:20"


@dataclass(frozen=True)
class PatchSchedule:
    stages: tuple[tuple[int, int], ...]  # (first epoch, patch side), epochs increasing from 0
    batch_size: int  # per rank, at the final patch
    batch: str = "keep"

    def __post_init__(self):
        epochs = [e for e, _ in self.stages]
        if not self.stages or epochs[0] != 0:
            raise ValueError(f"got stages starting at epoch {epochs[0] if epochs else 'none'}, "
                             f"expected the first stage at epoch 0, e.g. {EXAMPLE}")
        if any(b <= a for a, b in zip(epochs, epochs[1:])):
            raise ValueError(f"got stage epochs {epochs}, expected them strictly increasing")
        if min(p for _, p in self.stages) < 1 or self.batch_size < 1:
            raise ValueError(f"got patches {[p for _, p in self.stages]} and batch size "
                             f"{self.batch_size}, expected >= 1")
        if self.batch not in BATCH_SCHEDULES:
            raise ValueError(f"got batch schedule {self.batch!r}, expected one of "
                             f"{', '.join(BATCH_SCHEDULES)}")

    @classmethod
    def parse(cls, text: str, batch_size: int, batch: str = "keep") -> "PatchSchedule":
        """``"128:0,192:10,256:20"`` (``PATCH:EPOCH`` pairs) -> a schedule."""
        stages = []
        for part in str(text).replace(" ", "").split(","):
            try:
                patch, epoch = (int(v) for v in part.split(":"))
            except ValueError:
                raise ValueError(f"got {part!r} in {text!r}, expected PATCH:EPOCH pairs such "
                                 f"as {EXAMPLE}") from None
            stages.append((epoch, patch))
        return cls(tuple(stages), batch_size, batch)

    @property
    def text(self) -> str:
        """The canonical ``PATCH:EPOCH,...`` form (what configs and checkpoints store)."""
        return ",".join(f"{p}:{e}" for e, p in self.stages)

    @property
    def final(self) -> int:
        return self.stages[-1][1]

    def patch(self, epoch: int) -> int:
        return [p for e, p in self.stages if e <= epoch][-1]

    def batch_size_at(self, epoch: int) -> int:
        if self.batch == "keep":
            return self.batch_size
        grown = round(self.batch_size * (self.final / self.patch(epoch)) ** 2)
        return max(1, min(grown, MAX_BATCH_GROWTH * self.batch_size))

    def __call__(self, epoch: int) -> tuple[int, int]:
        """(patch side, batch size) of ``epoch``."""
        return self.patch(epoch), self.batch_size_at(epoch)

    def check(self, scale: int, shortest: int | None = None, epochs: int | None = None):
        """Raise ValueError naming the first stage that cannot run: a patch not divisible by
        ``scale``, larger than the ``shortest`` image side, or a stage after the last epoch."""
        for e, p in self.stages:
            if p % scale:
                lo = p - p % scale
                raise ValueError(f"patch {p} (from epoch {e}) is not divisible by scale "
                                 f"{scale}; use {lo} or {lo + scale}")
            if shortest is not None and p > shortest:
                raise ValueError(f"patch {p} (from epoch {e}) is larger than the smallest "
                                 f"image ({shortest} px short side); use "
                                 f"{shortest - shortest % scale} or less, or pack with "
                                 f"--min-size {p}")
            if epochs is not None and e >= epochs:
                raise ValueError(f"the stage {p}:{e} starts after the last epoch "
                                 f"({epochs} epochs: 0 to {epochs - 1}); drop it or raise "
                                 "--epochs")
