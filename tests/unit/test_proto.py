"""The committed generated code matches proto/ (regenerated with the pinned grpcio-tools)."""

from __future__ import annotations

from scripts.protogen import OUT_DIR, generate


def test_generated_code_is_up_to_date(tmp_path):
    fresh = generate(tmp_path)
    for path in fresh:
        committed = OUT_DIR / path.name
        assert committed.exists(), f"{committed} missing: run 'make proto'"
        assert committed.read_text() == path.read_text(), f"{committed} stale: run 'make proto'"
