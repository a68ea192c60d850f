"""Console + file logging and TensorBoard scalars.

Only the main process writes (files, TensorBoard); other ranks log warnings to
the console only. Scalars are passed as Python floats: callers accumulate
tensors on the device and convert once per logging interval, so logging never
adds a host sync per step.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

LOGGER_NAME = "mgsv"


def setup_logger(log_file: str | os.PathLike | None = None, is_main: bool = True) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%m/%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if log_file is not None and is_main:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


class Scalars:
    """A TensorBoard SummaryWriter that is a no-op when disabled or off the main rank."""

    def __init__(self, log_dir: str | os.PathLike | None, enabled: bool = True, purge_step: int | None = None):
        """purge_step (a resumed run's first step): TensorBoard hides the events at and after it
        that a killed run had already written, so curves do not show the redone steps twice."""
        self.writer = None
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is slow to import
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def add(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, float(value), step)

    def add_many(self, prefix: str, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.add(f"{prefix}/{key}", value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
