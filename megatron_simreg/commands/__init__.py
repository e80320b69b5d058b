"""The ``megatron-simreg`` subcommands, one module each (registered in :mod:`megatron_simreg.cli`)."""
