"""Scale out: upscale a dataset, a folder or a video on a Ray cluster, and videos on one machine.

``pip install 'flashstep[ray]'`` brings Ray Data and PyAV. Importing this package imports neither;
each name loads its module on first use.

===========================  =====================================================================
name                         what it does
===========================  =====================================================================
``upscale_dataset``          a Ray dataset's ``image`` column upscaled (``ray_upscale``)
``upscale_files``            files read, upscaled and written on the cluster, one result row each
``upscale_video_on_ray``     a video's frames upscaled on the cluster, encoded here in order
``upscale_video``            a video upscaled on this machine (``video``)
``UpscaleActor``             the ``map_batches`` worker class: one pipeline per actor
===========================  =====================================================================
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "upscale_dataset": "ray_upscale",
    "upscale_files": "ray_upscale",
    "upscale_video_on_ray": "ray_upscale",
    "iter_results": "ray_upscale",
    "pending": "ray_upscale",
    "UpscaleActor": "ray_upscale",
    "FileUpscaleActor": "ray_upscale",
    "PipelineSpec": "ray_upscale",
    "WorkerPlan": "ray_upscale",
    "upscale_video": "video",
    "VideoWriter": "video",
    "VideoError": "video",
    "probe": "video",
    "read_frames": "video",
    "is_video": "video",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)
