"""The training engine: data encoding, the train loop, checkpoints, and the worker process.

The daemon needs only two entry points: ``python -m core.worker --run-dir DIR`` (one job's
training, reporting through files and the DB) and ``core.embedded.ensure_embedded_model``.
"""
