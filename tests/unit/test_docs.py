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


TOP = ("trainer", "models", "data", "evaluation", "export", "bench", "scripts", "tests", "configs", "ds_configs",
       "docs")
PLACEHOLDERS = {"configs/x.yaml"}  # "your experiment's config"
REFERENCE_FILES = {"models/head.py", "models/vision_transformer.py"}  # bytedance/ibot's files (fidelity.md)
FILE = re.compile(r"(?<![\w./<-])((?:" + "|".join(TOP) + r")/[\w./-]+\.(?:py|yaml|json|md|sbatch|sh))(?:::(\w+))?")


def test_every_file_and_test_the_docs_name_exists():
    """Paths written in the text (not only links) and `file::test` names: the code moves, the docs follow."""
    bad = []
    for page in PAGES:
        for n, line in enumerate(page.read_text().splitlines(), 1):
            for path, test in FILE.findall(line):
                if "*" in path or "<" in path or path in PLACEHOLDERS | REFERENCE_FILES:  # not ours
                    continue
                target = ROOT / path
                if not target.exists():
                    bad.append(f"{page.relative_to(ROOT)}:{n}: {path}")
                elif test and not re.search(rf"def {test}\b", target.read_text()):
                    bad.append(f"{page.relative_to(ROOT)}:{n}: {path}::{test}")
    assert not bad, "\n".join(bad)
