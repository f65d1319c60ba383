"""Backends of the ops: ``triton`` and ``cuda`` (GPU kernels), ``cpu`` (C++ CPU kernels) and ``aten``
(compositions of torch's own kernels). ``flashstep.registry`` explains how one is chosen."""
