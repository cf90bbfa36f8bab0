"""docker-compose.yml is validated by a Compose parser (no Docker engine runs here) and a structure check."""

from __future__ import annotations

import os
import shutil
import subprocess

from tests.conftest import ROOT, service_missing


def test_compose_file_is_valid_and_consistent() -> None:
    if shutil.which("docker-compose") is None and os.environ.get("CI"):
        service_missing("docker-compose (the Compose parser)", "apt-get install -y docker-compose")
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check-compose.sh")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "structure ok" in result.stdout
    if shutil.which("docker-compose"):
        assert "docker-compose config: ok" in result.stdout
