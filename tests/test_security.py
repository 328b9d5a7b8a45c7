"""Nothing that could run code is ever loaded: no pickle, no torch.load, no allow_pickle."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(
    p for d in ("hnet_serve", "training", "export") for p in (ROOT / d).rglob("*.py")
)
FORBIDDEN = {
    r"\bimport\s+pickle\b|\bfrom\s+pickle\b|\bcPickle\b|\bdill\b": "pickle",
    r"\btorch\.load\s*\(": "torch.load",
    r"allow_pickle\s*=\s*True": "numpy allow_pickle=True",
    r"\bjoblib\.load\b": "joblib.load",
    r"(?<![\w.])eval\s*\(|(?<![\w.])exec\s*\(": "eval/exec",
    r"yaml\.load\s*\((?![^)]*SafeLoader)|yaml\.unsafe_load|yaml\.full_load": "unsafe YAML load",
    r"\bmarshal\.loads?\b|\bshelve\b": "marshal/shelve",
}


def test_sources_found():
    assert len(SOURCES) >= 8, SOURCES


@pytest.mark.parametrize("pattern", list(FORBIDDEN))
def test_no_unsafe_deserialization(pattern):
    hits = []
    for path in SOURCES:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(pattern, code):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not hits, f"{FORBIDDEN[pattern]} found:\n" + "\n".join(hits)


def test_the_guard_catches_what_it_looks_for():
    """The patterns really match the calls they forbid (so the tests above can fail)."""
    samples = {
        "import pickle": "pickle",
        "x = torch.load(path)": "torch.load",
        "np.load(f, allow_pickle=True)": "numpy allow_pickle=True",
        "yaml.load(text)": "unsafe YAML load",
        "eval(s)": "eval/exec",
    }
    for code, what in samples.items():
        assert any(re.search(p, code) for p, w in FORBIDDEN.items() if w == what), code
    assert not re.search(r"(?<![\w.])eval\s*\(", "model.eval()")
    assert not re.search(r"yaml\.load\s*\((?![^)]*SafeLoader)", "yaml.load(t, Loader=yaml.SafeLoader)")
