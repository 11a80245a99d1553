"""The kernels run only under the torch release they were compiled against: the library records it, the package's
metadata requires it, and importing under another release is refused with a clear error instead of risking a
C++ ABI mismatch that loads and runs wrong."""
import importlib.metadata
import subprocess
import sys
import textwrap

import pytest
import torch

from semshare_ops import _C
from semshare_ops.ops import check_torch_version


def release(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def test_library_records_the_running_torch_release():
    # The in-place build is compiled against the venv's torch: its record must say so (a stale or foreign build
    # would have been refused at import, below).
    assert release(_C.TORCH_VERSION) == release(torch.__version__), (_C.TORCH_VERSION, torch.__version__)
    assert _C.TORCH_VERSION.count(".") == 2 and "+" not in _C.TORCH_VERSION, _C.TORCH_VERSION


def test_metadata_requires_the_build_torch_release():
    requires = importlib.metadata.requires("semshare_ops") or []
    torch_reqs = [r for r in requires if r.replace(" ", "").startswith("torch") and ";" not in r]
    assert torch_reqs == [f"torch=={release(_C.TORCH_VERSION)}.*"], requires


@pytest.mark.parametrize("running", ["2.13.0", "2.13.0+cpu", "2.13.1+cu130", "2.13.0a0+git1234"])
def test_same_release_is_accepted(running):
    check_torch_version("2.13.0", running)


@pytest.mark.parametrize("running", ["2.14.1+cu130", "2.12.0", "3.13.0", "2.1.3"])
def test_other_release_is_refused_naming_both(running):
    with pytest.raises(ImportError) as info:
        check_torch_version("2.13.0", running)
    message = str(info.value)
    assert "torch 2.13.0" in message and f"torch {running}" in message and "--no-build-isolation" in message


def test_import_under_another_torch_release_is_refused():
    # What a user with another torch sees: the import itself fails with the message, nothing half-registered is used.
    # Simulated in a fresh interpreter by making torch report another release before semshare_ops loads.
    other = "2.99.0+cpu" if release(torch.__version__) != "2.99" else "2.98.0+cpu"
    code = textwrap.dedent(f"""
        import torch
        torch.__version__ = {other!r}
        try:
            import semshare_ops
        except ImportError as e:
            print("REFUSED:", e)
        else:
            print("LOADED")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("REFUSED:") and f"torch {other} is installed" in out.stdout, out.stdout
