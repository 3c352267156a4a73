"""Point the four notebooks at a GitHub repository: the Colab badge of each (in its first cell) and the
`REPO` that its setup cell clones on Colab, eight places in all, set by one command in a clone:

    python notebooks/set_repo.py OWNER/REPO

It also removes the note under each badge that explains the placeholder, which no longer applies. It says
what it changed and changes nothing else. Commit and push the notebooks afterwards: a badge opens
the notebook as it is on GitHub's main branch."""

import argparse
import re
from pathlib import Path

import nbformat

NAME = re.compile(r"[\w.-]+/[\w.-]+")
BADGE = re.compile(r"(colab\.research\.google\.com/github/)([\w.-]+/[\w.-]+)(/blob/main/notebooks/)")
CONSTANT = re.compile(r'^(REPO = ")([^"]*)(")', re.MULTILINE)
NOTE = re.compile(r'\n\*If the badge opens a "not found" page[^\n]*\n')  # under the badge, about OWNER


def places(nb):
    """(badge cell, its match), (setup cell, its match): the first cell and the first code cell."""
    setup = next((c for c in nb.cells if c.cell_type == "code"), None)
    return [(cell, pattern.search(cell.source) if cell is not None else None)
            for cell, pattern in ((nb.cells[0] if nb.cells else None, BADGE), (setup, CONSTANT))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repo", metavar="OWNER/REPO", help="the repository on GitHub, e.g. ada/uninext")
    repo = p.parse_args(argv).repo
    if not NAME.fullmatch(repo):
        p.error(f"{repo!r} is not OWNER/REPO")
    paths = sorted(Path(__file__).resolve().parent.glob("[0-9][0-9]_*.ipynb"))
    notebooks = {path: nbformat.read(path, as_version=4) for path in paths}
    if not notebooks:
        p.error(f"no notebooks next to {Path(__file__).name}")
    for path, nb in notebooks.items():  # every notebook checked before any is written
        (_, badge), (_, constant) = places(nb)
        if badge is None or constant is None:
            missing = "Colab badge in its first cell" if badge is None else "REPO = in its setup cell"
            p.error(f"{path.name} has no {missing}; nothing changed")
    for path, nb in notebooks.items():
        changes = []
        for (cell, match), what, pattern in zip(places(nb), ("badge", "REPO"), (BADGE, CONSTANT)):
            if match.group(2) != repo:
                cell.source = pattern.sub(lambda m: m.group(1) + repo + m.group(3), cell.source, count=1)
                changes.append(f"{what} {match.group(2)} -> {repo}")
        first = nb.cells[0]
        if NOTE.search(first.source):
            first.source = NOTE.sub("", first.source, count=1)
            changes.append("placeholder note removed")
        if changes:
            nbformat.write(nb, path)
        print(f"{path.name}: {', '.join(changes) if changes else f'already {repo}'}")


if __name__ == "__main__":
    main()
