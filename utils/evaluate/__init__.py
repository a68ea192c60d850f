"""Evaluation: the SmG / MsG / MoR metrics (metrics.py), a model's evaluation of a split
(engine.py, shared by train.py and test.py), the standalone evaluator of prediction files and the
baselines (offline.py, `python -m utils.evaluate`), and the canonical-clip statistics, the
track_prior baseline and the seen / unseen breakdown (track_prior.py)."""
