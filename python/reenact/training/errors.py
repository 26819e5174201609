"""The exceptions of ``reenact train``: user-facing, reported as one line by the CLI."""


class TrainingError(Exception):
    """A user-facing training failure (bad arguments, incompatible checkpoint, non-finite loss)."""


class NonFiniteLoss(TrainingError):
    """A loss became NaN or infinite; ``step`` and ``term`` name where."""

    def __init__(self, step, term, value):
        super().__init__(f"non-finite loss at step {step}: {term} = {value} "
                         f"(stopped; no checkpoint of this state was written)")
        self.step, self.term, self.value = step, term, value
