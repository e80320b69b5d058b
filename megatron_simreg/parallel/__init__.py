"""Parallel helpers: SimReg/JREG sums for TP/SP/CP/PP shards (imports megatron-core); the device for collectives; process-group start-up."""
