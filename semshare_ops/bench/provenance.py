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
    this process's command line, `semshare ...` for the console script)."""
    import transformers

    from .. import __version__

    name = torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or platform.machine())
    argv = list(sys.argv if command is None else command)
    program = "semshare" if argv and argv[0].endswith("semshare") else "python " + argv[0] if argv else ""
    return {"device": device, "device_name": name, "semshare_ops": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(),
            "command": " ".join([program] + [shlex.quote(a) for a in argv[1:]]).strip()}
