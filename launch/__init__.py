"""Launching runs: SLURM jobs through submitit (submit.py, the in-job task.py, requeue on preemption),
job status (jobs.py, registry.py), sweep files (sweep.py) with decay branches (branch.py), run here
(local.py) or as a job array, and collecting their results (collect.py).

Imported as ``psm_train.launch``; it sits on top: nothing in psm_train imports it except the CLI. The
trainer stays launcher-agnostic: each task runs ``psm_train.train.loop.train(cfg)``, which initialises
torch.distributed from the SLURM (or torchrun) variables itself and asks
:func:`psm_train.train.preemption.should_stop` at step boundaries.
"""
