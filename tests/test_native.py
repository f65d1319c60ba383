"""The native module: it imports without a GPU and says how it was built; `flashstep info` works."""
import json
import os
import subprocess
import sys

import flashstep
from flashstep import _native


def test_native_module_is_built_and_reports_its_build():
    assert _native._C is not None, _native.IMPORT_ERROR
    expected = os.environ.get("FLASHSTEP_EXPECT_CUDA")
    if expected is not None:
        assert _native.WITH_CUDA == (expected == "1")
    if _native.WITH_CUDA:
        assert _native.CUDA_ARCHS
    assert _native._C.cuda_device_count() >= 0


def test_info_lists_every_op_with_its_backends():
    details = flashstep.info()
    names = {op.name for op in details.ops}
    assert names == set(flashstep.ops.OP_NAMES)
    for op in details.ops:
        assert "torch" in op.runnable and "aten" in op.runnable
    assert details.version == flashstep.__version__


def test_info_command_line_prints_json():
    result = subprocess.run([sys.executable, "-m", "flashstep", "info", "--json"], capture_output=True, text=True, check=True)
    parsed = json.loads(result.stdout)
    assert {op["name"] for op in parsed["ops"]} == set(flashstep.ops.OP_NAMES)


def test_import_does_not_import_triton_or_initialise_cuda():
    code = "import sys, flashstep, flashstep.ops; print('triton' in sys.modules)"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == "False"


def test_info_says_why_a_backend_runs_nothing_here():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    code = "import json, flashstep; print(json.dumps(flashstep.info().as_dict()))"
    parsed = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       env=env).stdout)
    runnable = {backend for op in parsed["ops"] for backend in op["runnable"]}
    registered = {backend for op in parsed["ops"] for backend in op["registered"]}
    assert set(parsed["idle_backends"]) == registered - runnable
    for reason in parsed["idle_backends"].values():
        assert reason and "not available on this machine" not in reason
    text = subprocess.run([sys.executable, "-m", "flashstep", "info"], capture_output=True, text=True, check=True,
                          env=env).stdout
    for backend, reason in parsed["idle_backends"].items():
        assert f"{backend}" in text and reason in text
    if "triton" in parsed["idle_backends"]:  # no GPU here: the reason names the way to run it on the CPU
        assert "TRITON_INTERPRET=1" in parsed["idle_backends"]["triton"] or "not installed" in parsed["idle_backends"]["triton"]
