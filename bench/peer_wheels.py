"""The peer libraries' wheels for a lent GPU machine (which cannot download), small enough to travel.

    python -m bench.peer_wheels            # into .whl/ (git-ignored: /.whl/ in .gitignore)

Downloads, for CPython 3.12 on manylinux x86-64 and without dependencies, the pinned wheels below:
bitsandbytes and Liger-Kernel, Unsloth with unsloth_zoo and the packages they import that the GPU
image lacks (its image has torch 2.11, triton 3.6, transformers 5.17, peft, accelerate, numpy,
pandas, pyarrow, ...; Unsloth 2026.10.9 accepts transformers <= 5.17). Two wheels are slimmed, as
they would not fit the 64 MiB that travels with a run: bitsandbytes keeps only its CUDA 13 and CPU
libraries (the image's torch is built with CUDA 13.0; the others are 100 MB), Unsloth drops
``studio/`` (its web application: 85 MB of the 89 unpacked). A slimmed wheel is rewritten with the
removed files' lines taken out of its RECORD, so pip installs it as any other.
"""

from __future__ import annotations

import argparse
import fnmatch
import subprocess
import sys
import zipfile
from pathlib import Path

WHEELS = (
    "bitsandbytes==0.50.2", "liger-kernel==0.8.5",
    "unsloth==2026.10.9", "unsloth_zoo==2026.10.9", "trl==1.15.0", "datasets==4.8.5", "dill==0.4.1",
    "multiprocess==0.70.19", "tyro==1.0.17", "docstring-parser==0.18.0", "typeguard==4.6.1", "shtab==1.13.0",
    "torchao==0.18.0", "cut-cross-entropy==25.1.1", "msgspec==0.23.0", "json5==0.17.3", "nest-asyncio==1.6.0",
    "structlog==26.1.0", "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.7.0",
    "typing-inspection==0.4.2",
)
DROP = {  # wheel name prefix -> members to leave out
    "bitsandbytes-": ("bitsandbytes/libbitsandbytes_cuda1[0-2]*.so", "bitsandbytes/libbitsandbytes_rocm*.so"),
    "unsloth-2": ("studio/*",),
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any")


def slim(wheel: Path, patterns: tuple[str, ...]) -> int:
    """Rewrite ``wheel`` without the members matching ``patterns`` (and their RECORD lines); returns
    how many were removed."""
    tmp = wheel.with_suffix(".tmp")
    removed = 0
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {n for n in src.namelist() if any(fnmatch.fnmatch(n, p) for p in patterns)}
        for info in src.infolist():
            if info.filename in dropped:
                removed += 1
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(line for line in lines if line.split(",")[0] not in dropped) + "\n").encode()
            dst.writestr(info, data)
    tmp.replace(wheel)
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer_wheels", description=__doc__.split("\n")[0])
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parent.parent / ".whl")
    args = parser.parse_args(argv)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(args.dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + list(WHEELS), check=True)
    for wheel in sorted(args.dest.glob("*.whl")):
        for prefix, patterns in DROP.items():
            if wheel.name.startswith(prefix):
                print(f"{wheel.name}: {slim(wheel, patterns)} files left out")
    total = sum(w.stat().st_size for w in args.dest.glob("*.whl"))
    print(f"{len(list(args.dest.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
