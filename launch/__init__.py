"""Cluster launch: SLURM/local jobs through submitit, preemption and requeue, job status, sweeps.

Imported as ``psm_train.launch``. The trainer stays launcher-agnostic: each task runs
``psm_train.train.loop.train(cfg)``, which initialises torch.distributed from the SLURM (or
torchrun) variables itself and asks :func:`psm_train.launch.preemption.should_stop` at step
boundaries.
"""
