"""Fast compositions of torch's own kernels (cuDNN/cuBLAS/oneDNN, SDPA), in the input dtype.

This is the production path wherever none of our kernels applies: on CPU, and on GPU as the fallback.
"""


def available() -> bool:
    return True


def auto_eligible() -> bool:
    return True


def unavailable_reason() -> str:
    return ""
