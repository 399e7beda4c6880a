"""The architecture as tests: import directions, and an SDK that never loads torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"common": "embedq.common", "producer": "embedq.producer", "worker": "embedq.worker"}
FORBIDDEN = {
    "common": ("embedq.producer", "embedq.worker", "embedq.up", "embedq.cli"),
    "producer": ("embedq.worker", "embedq.up", "embedq.cli"),
    "worker": ("embedq.producer", "embedq.up", "embedq.cli"),
}
HEAVY = ("torch", "transformers", "sentence_transformers")


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_import_directions(folder: str) -> None:
    for path in (ROOT / folder).rglob("*.py"):
        for name in _imports(path):
            assert not name.startswith(FORBIDDEN[folder]), f"{path.relative_to(ROOT)} imports {name}"


def test_heavy_imports_only_in_worker_backends() -> None:
    for folder in ("common", "producer", "worker", "embedq"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if rel.parts[:2] == ("worker", "backends"):
                continue
            for name in _imports(path):
                assert name.split(".")[0] not in HEAVY, f"{rel} imports {name}"


def test_sdk_import_loads_no_torch() -> None:
    code = (
        "import sys, embedq, embedq.producer, embedq.common.wire, embedq.common.codec;"
        "from embedq import AsyncClient, Client;"
        "bad = [m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gateway_loads_no_torch() -> None:
    code = (
        "import sys;"
        "from embedq.producer.gateway.app import create_app;"
        "from embedq.producer.gateway.config import GatewayConfig;"
        "create_app(GatewayConfig());"
        "bad = [m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_api_is_complete() -> None:
    import embedq

    for name in embedq.__all__:
        assert hasattr(embedq, name), name
    assert issubclass(embedq.ValidationError, embedq.RequestError)
    assert issubclass(embedq.RequestError, embedq.EmbedqError)


def test_package_type_checks_strictly() -> None:
    """mypy --strict over the real embedq namespace (scripts/typecheck.sh builds it: mypy
    cannot follow pyproject's package-dir mapping on its own)."""
    pytest.importorskip("mypy")
    script = ROOT / "scripts" / "typecheck.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
