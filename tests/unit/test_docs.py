"""The README is the front page (at most 250 lines) and every link in it and in docs/ resolves
inside the repository (a clone has nothing beside it)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for page in ("methods", "adding-a-method", "fidelity", "kernels", "export-and-evaluation", "slurm",
                 "checkpoints-and-faults", "scale", "benchmarks"):
        assert f"docs/{page}.md" in text, page


def test_every_link_resolves_inside_the_repository():
    bad = []
    for page in PAGES:
        for target, _ in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path = (page.parent / target).resolve()
            if ROOT not in path.parents or not path.exists():
                bad.append(f"{page.relative_to(ROOT)}: {target}")
        if "../shared" in page.read_text():
            bad.append(f"{page.relative_to(ROOT)}: names ../shared, which a clone does not have")
    assert not bad, "\n".join(bad)
