"""Parts of ``labelmatch tune``: search space, Ray Tune trainable, PBT history, storage, RayJob.

The one-call API is :func:`labelmatch.tune.tune_sft`.
"""
