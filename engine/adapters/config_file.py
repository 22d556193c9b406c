"""An adapter folder's ``adapter_config.json``, read as a JSON object whatever the method: the first
check of every reader (`engine.adapters.methods.folder_method` and each method's own)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from engine.errors import InputError

CONFIG_NAME = "adapter_config.json"


def read_config_json(adapter_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(the config file's path, its contents); InputError naming the folder or the file when the
    folder or the file is missing, or the file is not a JSON object."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not Path(adapter_dir).is_dir():
        raise InputError(f"{adapter_dir}: adapter folder not found")
    if not path.is_file():
        raise InputError(f"{path}: not found; an adapter folder has {CONFIG_NAME} and its weights "
                         "(adapter_model.safetensors)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object")
    return path, raw
