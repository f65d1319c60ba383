"""pytest setup for the op benchmarks: ``pytest benchmarks`` (pytest-benchmark).

The project's default test run (``testpaths = tests``) never loads this directory. Given it by name,
pytest collects ``bench_*.py`` here, and:

* a benchmark marked ``@pytest.mark.op(name)`` with a ``backend`` argument is parametrized over the
  op's flashstep backends that run on this machine (the ``torch`` reference appears once, as
  ``reference``) and the two peers, ``eager`` (the plain torch composition the models' other runtimes
  use) and ``compile`` (``torch.compile`` of that composition), then the extra peers the marker
  names (``@pytest.mark.op("attention", peers=("sdpa_flash", ...))``);
* the ``op_benchmark`` fixture times one case (:class:`OpBenchmark`);
* ``--budget-per-file SECONDS`` makes a file's remaining cases skip once it has run that long
  (``benchmarks/gpu_check.sh`` shares its minutes that way).

Device and dtype: bf16 on a CUDA device when one is present, else fp32 on the CPU (where the Triton
backend runs only in its interpreter and is skipped). Every case's output is checked against the fp32
reference before it is timed.
"""
from __future__ import annotations

import functools
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from flashstep import registry  # noqa: E402
from flashstep.backends.triton import interpreting  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
PEERS = ("eager", "compile")
REFERENCE = "reference"

# ‖out − ref‖ / ‖ref‖ allowed against the fp32 reference: fp32 math lands far below 1e-4, bf16
# operands between 1e-3 and 1e-2; a wrong kernel lands near 1.
RELATIVE_ERROR_LIMIT = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
WARMUP_ROUNDS = 2
MAX_ROUNDS = 500
# The GPU's L2 cache is overwritten before every timed launch (as triton.testing.do_bench does), so
# that weights and inputs come from memory as they do in a model's forward pass.
L2_FLUSH_BYTES = 256 << 20


def pytest_addoption(parser):
    parser.addoption(
        "--budget-per-file",
        type=float,
        default=None,
        metavar="SECONDS",
        help="after this many seconds in one bench_*.py file, its remaining cases skip, saying so",
    )


def pytest_configure(config):
    config.addinivalue_line("python_files", "bench_*.py")
    config.addinivalue_line(
        "markers",
        "op(name, peers=()): the op a benchmark measures; with a `backend` argument, the benchmark runs "
        "every backend of flashstep.ops.<name> that runs here, the reference, the eager and compile peers "
        "and the named extra peers",
    )


def benchmark_backends(op_name: str, extra_peers: Sequence[str] = ()) -> list:
    """reference, the op's backends that run here (minus the reference itself), eager, compile, and
    the benchmark's own extra peers."""
    runnable = [b for b in registry.get(op_name).backends() if b != "torch"]
    return [REFERENCE, *runnable, *PEERS, *extra_peers]


# NOTE: trylast, so that the case (``shape``) parametrization from the decorators comes first: each
# case's backends then run one after another, side by side in the report, and a time budget that
# ends a file early drops whole cases rather than one backend of every case.
@pytest.hookimpl(trylast=True)
def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("op")
    if marker is not None and "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", benchmark_backends(marker.args[0], marker.kwargs.get("peers", ())))


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def _commit() -> str:
    """The checkout's commit, "+dirty" when tracked files changed, "unknown" outside a git checkout."""
    try:
        commit = _git("rev-parse", "--short=12", "HEAD")
        return commit + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device_name() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name()
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _compile_unavailable_reason() -> Optional[str]:
    """None when torch.compile can run here, else why not."""
    from torch._dynamo import is_dynamo_supported

    if not is_dynamo_supported():
        return "torch.compile does not support this Python or platform"
    if not ON_GPU and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "torch.compile on the CPU needs a C++ compiler and none is on PATH"
    return None


class Timer:
    """Seconds of one call: CUDA events around the launch after an L2 flush, or the host clock on a CPU."""

    def __init__(self):
        if ON_GPU:
            self.flush_buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=DEVICE)
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def time_one(self, fn: Callable) -> float:
        if not ON_GPU:
            started = time.perf_counter()
            fn()
            return time.perf_counter() - started
        self.flush_buffer.zero_()
        self.start.record()
        fn()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3


class Session:
    """What the cases of one pytest run share: the commit, the timer, the per-file clocks."""

    def __init__(self, budget_per_file: Optional[float]):
        self.commit = _commit()
        self.device_name = _device_name()
        self.budget_per_file = budget_per_file
        self.file_started = {}
        self.compiled_ops = set()
        self.compile_unavailable = _compile_unavailable_reason()
        self._timer = None

    @property
    def timer(self) -> Timer:
        if self._timer is None:
            self._timer = Timer()
        return self._timer

    def check_budget(self, path) -> None:
        started = self.file_started.setdefault(path, time.monotonic())
        if self.budget_per_file is not None and time.monotonic() - started > self.budget_per_file:
            pytest.skip(f"this file's time budget (--budget-per-file={self.budget_per_file:g} s) is spent")


@pytest.fixture(scope="session")
def bench_session(request) -> Session:
    return Session(request.config.getoption("budget_per_file"))


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp32 (NaN anywhere gives NaN)."""
    difference = (out.float() - reference.float()).norm()
    return (difference / reference.float().norm().clamp_min(torch.finfo(torch.float32).tiny)).item()


class OpBenchmark:
    """Times one benchmark case and records it (``benchmark.extra_info``).

    ``run`` resolves a backend name to a call: ``reference`` and the flashstep backends call the public
    op (``ours(name)``), ``eager`` calls the peer composition, ``compile`` calls ``torch.compile`` of it.
    ``run_call`` times any call under a given name (e.g. one SDPA kernel). The case's output is checked
    against the reference first, then the call is timed in ``benchmark.pedantic`` rounds of one launch.

    Recorded: op, backend, case, shape, dtype, device, commit, ``median_ms`` (per launch; from CUDA
    events on a GPU), ``tflops`` and/or ``gbps`` achieved, ``relative_error`` against the reference.
    pytest-benchmark's own columns are the host time of a round (L2 flush, launch, synchronize).
    """

    def __init__(self, benchmark, request, session: Session):
        self.benchmark = benchmark
        self.request = request
        self.session = session
        marker = request.node.get_closest_marker("op")
        if marker is None:
            raise pytest.UsageError(f"{request.node.nodeid}: mark the benchmark with @pytest.mark.op(name)")
        self.op_name = marker.args[0]
        self.dtype = DTYPE
        self.device = DEVICE

    # -- inputs ----------------------------------------------------------------------------------
    def tensor(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        """Normal random values in the benchmark dtype on the benchmark device (never zeros)."""
        return (torch.randn(shape, device=self.device, dtype=torch.float32) * scale).to(self.dtype)

    def weight(self, *shape: int) -> torch.Tensor:
        """A weight scaled by 1/sqrt(fan-in) (fan-in: every dim but the first), so outputs stay O(1)."""
        fan_in = 1
        for size in shape[1:]:
            fan_in *= size
        return self.tensor(*shape, scale=fan_in**-0.5)

    # -- timing ----------------------------------------------------------------------------------
    def run(
        self,
        shape,
        backend: str,
        *,
        ours: Callable[[str], torch.Tensor],
        eager: Callable[..., torch.Tensor],
        args: Sequence,
        flops: Optional[int] = None,
        bytes_moved: Optional[int] = None,
        variant: Optional[str] = None,
    ) -> None:
        """Time ``backend`` on one case: ``ours(name)`` runs flashstep's op with backend ``name``,
        ``eager(*args)`` is the peer composition."""
        self._start_case(shape, backend, flops, bytes_moved, variant)
        if backend == "eager":
            call = functools.partial(eager, *args)
        elif backend == "compile":
            call = self._compiled(eager, args)
        else:
            name = "torch" if backend == REFERENCE else backend
            if name == "triton" and interpreting():
                pytest.skip("the Triton backend runs in its CPU interpreter here (TRITON_INTERPRET=1): too slow")
            call = functools.partial(ours, name)
        self._measure(call, None if backend == REFERENCE else lambda: ours("torch"))

    def run_call(
        self,
        shape,
        name: str,
        call: Callable[[], torch.Tensor],
        reference: Optional[Callable[[], torch.Tensor]],
        *,
        flops: Optional[int] = None,
        bytes_moved: Optional[int] = None,
        variant: Optional[str] = None,
    ) -> None:
        """Time ``call`` under the backend name ``name``; ``reference`` (None: no check) gives the truth."""
        self._start_case(shape, name, flops, bytes_moved, variant)
        self._measure(call, reference)

    def _start_case(self, shape, backend, flops, bytes_moved, variant) -> None:
        self.session.check_budget(self.request.node.path)
        case = shape.name if variant is None else f"{variant} {shape.name}"
        self.flops, self.bytes_moved = flops, bytes_moved
        self.benchmark.group = f"{self.op_name} {case}"
        self.benchmark.extra_info.update(
            op=self.op_name,
            backend=backend,
            case=case,
            shape={k: v for k, v in vars(shape).items() if k != "name"},
            dtype=str(self.dtype).replace("torch.", ""),
            device=self.session.device_name,
            commit=self.session.commit,
        )
        if flops is not None:
            self.benchmark.extra_info["flops"] = flops
        if bytes_moved is not None:
            self.benchmark.extra_info["bytes"] = bytes_moved

    def _compiled(self, eager: Callable, args: Sequence) -> Callable[[], torch.Tensor]:
        if self.session.compile_unavailable:
            pytest.skip(self.session.compile_unavailable)
        if not ON_GPU:
            if self.op_name in self.session.compiled_ops:
                pytest.skip("on the CPU torch.compile runs for the first case of each op only (CI time)")
            self.session.compiled_ops.add(self.op_name)
        # NOTE: a fresh dynamo cache per case: every shape gets its own static graph, and the cases of
        # one function never reach dynamo's recompile limit (past which it silently runs eager).
        torch._dynamo.reset()
        call = functools.partial(torch.compile(eager, dynamic=False), *args)
        try:
            call()
        except Exception as error:  # noqa: BLE001 - any failure here is torch.compile's, not the op's
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            pytest.skip(f"torch.compile cannot run this case here: {type(error).__name__}: {first_line}")
        return call

    def _first_call(self, call: Callable[[], torch.Tensor]) -> torch.Tensor:
        try:
            return call()
        except registry.BackendUnavailableError as error:
            pytest.skip(str(error))

    def _check(self, out: torch.Tensor, reference: Optional[Callable[[], torch.Tensor]]) -> None:
        if reference is None:
            return
        expected = reference()
        assert out.shape == expected.shape, f"output shape {tuple(out.shape)} != reference {tuple(expected.shape)}"
        error = relative_error(out, expected)
        self.benchmark.extra_info["relative_error"] = error
        limit = RELATIVE_ERROR_LIMIT[self.dtype]
        assert error <= limit, f"‖out − ref‖/‖ref‖ = {error:.3g} exceeds {limit:g} for {self.dtype}"

    def _measure(self, call: Callable[[], torch.Tensor], reference: Optional[Callable[[], torch.Tensor]]) -> None:
        if self.benchmark.disabled:
            out = self._first_call(lambda: self.benchmark.pedantic(call))
            self._check(out, reference)
            return
        out = self._first_call(call)
        self._check(out, reference)
        del out
        timer = self.session.timer
        estimate = min(timer.time_one(call) for _ in range(WARMUP_ROUNDS))
        config = self.request.config
        max_time = float(config.getoption("benchmark_max_time"))
        min_rounds = int(config.getoption("benchmark_min_rounds"))
        rounds = max(min_rounds, min(MAX_ROUNDS, int(max_time / max(estimate, 1e-6))))
        durations = []
        self.benchmark.pedantic(lambda: durations.append(timer.time_one(call)), rounds=rounds, warmup_rounds=0)
        median = statistics.median(durations)
        info = self.benchmark.extra_info
        info.update(median_ms=median * 1e3, rounds=len(durations))
        if self.flops is not None:
            info["tflops"] = self.flops / median / 1e12
        if self.bytes_moved is not None:
            info["gbps"] = self.bytes_moved / median / 1e9


@pytest.fixture
def op_benchmark(benchmark, request, bench_session) -> OpBenchmark:
    return OpBenchmark(benchmark, request, bench_session)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
