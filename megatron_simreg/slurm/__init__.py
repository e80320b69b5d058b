"""SLURM submission: sbatch scripts (:mod:`.script`), submission and status (:mod:`.submit`).

``megatron-simreg submit`` writes a readable sbatch script into a run
directory: one ``srun`` task per node starting ``torchrun`` (c10d rendezvous on
the job's first node), or DeepSpeed's launcher with ``--launcher slurm``. The
job asks for ``--signal=B:USR1@SECONDS`` and ``--requeue``; on the signal the
script tells the trainers to checkpoint at the next step boundary and exit,
then requeues the job, which resumes from ``RUN_DIR/checkpoints``.
"""
