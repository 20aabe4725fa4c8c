"""The ways a run ends on purpose, each with its exit code in ``train_imagenet.py``."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss (or weights): the run stops without saving them (exit 3)."""


class RunDirInUse(RuntimeError):
    """Another live job holds ``run.output_dir`` (exit 4)."""
