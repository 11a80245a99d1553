"""What every recorded result carries about where it was measured: device, versions, date, command."""
from __future__ import annotations

import datetime
import platform
import shlex
import sys
from typing import Dict, Optional, Sequence

import torch


def environment(device: str = "cpu", command: Optional[Sequence[str]] = None) -> Dict:
    """device, device_name, versions (semshare_ops, torch, transformers, python), threads, date, command (default:
    this process's command line, `semshare ...` for the console script, `python -m ...` for a module run so)."""
    import transformers

    from .. import __version__

    # The device given, not the current CUDA device (cuda:1 while cuda:0 is current).
    cuda = device.startswith("cuda")
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    argv = list(sys.argv if command is None else command)
    program = "semshare" if argv and argv[0].endswith("semshare") else "python " + argv[0] if argv else ""
    # Under `python -m semshare_ops.cli`, argv[0] is the path of its __main__.py: rerunning that breaks the package's
    # relative imports; the module it ran as reruns.
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if command is None and argv and getattr(spec, "name", None):
        program = "python -m " + spec.name.removesuffix(".__main__")
    return {"device": device, "device_name": name, "semshare_ops": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(),
            "command": " ".join([program] + [shlex.quote(a) for a in argv[1:]]).strip()}
