"""The floor every phase stands on: params (config, settings), the stage contract, outputs and
provenance, the runner, model loading and the memory model. Imports no phase."""
