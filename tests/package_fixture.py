"""One tiny package per session, built as tests/test_package.py builds one (a trained adapter,
merged weights), shared by the serving and export tests:

    from package_fixture import tiny_package  # noqa: F401  (the fixture)
"""
from __future__ import annotations

from pathlib import Path

import pytest

NAME = "medqlora-tiny-med"
QUESTIONS = ["What is anaemia?", "First-line treatment of hypertension?",
             "What does a high TSH mean?", "Define tachycardia.",
             "Which drug class is metformin?", "Quelle est la cause de l'anémie ?",
             "What is the normal range of potassium?", "Explain hypoglycaemia in one sentence."]


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory, tiny_model) -> Path:
    from test_package import _build, _inputs
    tmp = tmp_path_factory.mktemp("tiny-package")
    _build(_inputs(tmp, tiny_model), tmp / "package")
    return tmp / "package"
