"""Paths and tools shared by the deployment tests."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.deploy import dockerfile

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
KUBERNETES = DEPLOY / "kubernetes"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """The path of a command-line tool: first beside this Python (the venv), then PATH.

    A missing tool skips the test with the reason on a laptop and fails it under
    CI=true, the rule tests/conftest.py applies to backends.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is not None:
        return found
    message = f"{name} is not installed (looked in {beside.parent} and PATH)"
    if IN_CI:
        pytest.fail(f"CI=true and a required tool is missing: {message}")
    pytest.skip(message)


def parsed_dockerfile() -> dockerfile.Dockerfile:
    return dockerfile.parse(DOCKERFILE)


def load_healthcheck() -> ModuleType:
    """deploy/healthcheck.py as a module (it lives outside any package)."""
    spec = importlib.util.spec_from_file_location(
        "memsvc_image_healthcheck", DEPLOY / "healthcheck.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
