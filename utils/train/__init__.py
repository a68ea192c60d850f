"""Training setup: flags (options.py), checks before a run (preflight.py), devices, seeds, loaders,
model and optimiser (setup.py), checkpoints (checkpoint.py), learning-rate schedules
(schedules.py), the training loop (loop.py), torchrun helpers (distributed.py) and the lock that
keeps one writer per run folder (runlock.py)."""
