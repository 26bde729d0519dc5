"""The generated code in memsvc/v1 is exactly what scripts/gen_protos.py makes from proto/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_current(tmp_path):
    generator = load_generator()
    fresh = generator.generate(tmp_path)
    assert fresh, "the generator produced nothing"
    committed = sorted(
        p.relative_to(ROOT)
        for p in (ROOT / "memsvc" / "v1").iterdir()
        if p.name.endswith(generator.GENERATED_SUFFIXES)
    )
    assert committed == fresh, "generated files differ in name: run `make proto`"
    stale = [
        str(rel) for rel in fresh if (tmp_path / rel).read_bytes() != (ROOT / rel).read_bytes()
    ]
    assert not stale, f"stale generated code (run `make proto`): {stale}"
