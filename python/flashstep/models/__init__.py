"""Architectures written on :mod:`flashstep.ops`, with module and parameter names of the public checkpoints."""
