"""The documentation site: `mkdocs build --strict` (broken links, missing pages and pages left out of the
navigation fail it; the reference pages are generated from the code), then Debian's headless Chromium renders the
index and the generated CLI reference: title, navigation, a code block."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import has

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.skipif(not (has("mkdocs") and has("material")), reason="the docs extra is not installed"),
              pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                          "-d", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return out


def _render(page: Path, tmp_path: Path) -> str:
    """The page's DOM after Chromium has loaded and run it."""
    res = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--timeout=5000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0 and "</html>" in res.stdout, res.stderr[-2000:]
    return res.stdout


@pytest.mark.parametrize("page, title, heading, code", [
    ("index.html", "edgeport", "edgeport", "pip install"),
    ("reference/cli/index.html", "CLI - edgeport", "CLI reference", "edgeport build"),
    ("reference/config/index.html", "Configuration - edgeport", "Configuration reference", None),
])
def test_chromium_renders_the_built_site(site: Path, tmp_path: Path, page: str, title: str, heading: str,
                                         code: str | None) -> None:
    dom = _render(site / page, tmp_path)
    assert f"<title>{title}</title>" in dom, dom[:500]
    assert re.search(rf"<h1[^>]*>{re.escape(heading)}", dom), "the page's heading is not rendered"
    start = dom.find('<nav class="md-nav md-nav--primary"')
    assert start >= 0, "no navigation"
    nav = dom[start:dom.find('class="md-content"', start)]  # the primary navigation, its nested sections included
    assert "Getting started" in nav and "Benchmarks" in nav and "Troubleshooting" in nav
    if code:
        assert re.search(r"<code[^>]*>.*?" + re.escape(code.split()[0]), dom, re.S), "no code block"
    else:
        assert "<table>" in dom and "max_drop" in dom
