"""The documentation: the site builds with every link and anchor checked, the flag reference is
what the declarations say, and the README's links land.

- `mkdocs build --strict` (mkdocs.yml turns every link, anchor and nav warning into an error): a
  page linking to a moved section, or a page left out of the nav, fails the build.
- docs/flags.md equals scripts/flag_reference.py's output: a flag added, renamed or given another
  default or resume decision without the page regenerated fails here.
- The README lives outside the site: its links to docs/ pages and to its own sections are checked
  here, with GitHub's heading anchors.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import flag_reference  # noqa: E402


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", os.path.join(ROOT, "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "flags" / "index.html").exists()


def test_the_flag_reference_is_the_declarations():
    with open(os.path.join(ROOT, "docs", "flags.md"), encoding="utf-8") as f:
        assert f.read() == flag_reference.reference_text(), "docs/flags.md is stale: run python scripts/flag_reference.py"


def github_anchor(heading):
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_the_readme_links_land():
    readme = os.path.join(ROOT, "README.md")
    with open(readme, encoding="utf-8") as f:
        links = re.findall(r"\]\(([^)\s]+)\)", f.read())
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        path, _, anchor = link.partition("#")
        target = os.path.join(ROOT, path) if path else readme
        assert os.path.isfile(target), f"README links to {link}: no such file"
        if anchor:
            assert anchor in anchors(target), f"README links to {link}: no such heading there"
