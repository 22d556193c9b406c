"""Writing safetensors files with the operating system's errors kept as `OSError`.

safetensors' ``save_file`` reports a failed write (a full disk, a read-only folder, a file-size
limit) as its own ``SafetensorError("... I/O error: No space left on device (os error 28)")``.
`save_safetensors` raises it as the ``OSError`` it is, naming the file, so that every command
reports it like any other I/O error (one line with the path; `engine.errors.run_cli`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

_OS_ERROR = re.compile(r"os error (\d+)")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        match = _OS_ERROR.search(str(err))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(Path(path))) from None
