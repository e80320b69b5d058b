"""The pretraining pipeline: flags, launch, backends, checkpoints, metrics, the loop."""
