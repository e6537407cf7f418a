"""Generate the lab edition, `notebooks/lab/`, from the reading edition in `notebooks/`.

    python tools/make_lab.py            # (re)write notebooks/lab/*.ipynb
    python tools/make_lab.py --check    # exit 1 if notebooks/lab/ is not what the sources generate (CI)

A reading notebook marks what its lab edition keeps, in nbgrader's format:
- cells tagged `lab` go into the lab edition, in order (the build sections and their checks);
- in a solution cell (nbgrader metadata `solution: true`), the code between `### BEGIN SOLUTION` and
  `### END SOLUTION` is the reference solution; nbgrader's own `ClearSolutions` preprocessor replaces it
  with `# YOUR CODE HERE` / `raise NotImplementedError()`, keeping the signature and docstring around it;
- cells tagged `lab-check` run a checker on what the cell before built (`print(check_...(...))`).
nbdev's directives (`#| export ...`) are dropped: a lab notebook exports nothing. nbgrader is used as a library
(its preprocessor on an nbformat notebook): no course directory, database or server is needed.
`lab_notebook(path, clear=False)` gives the same notebook with the solutions in place (tests run it).
"""
import argparse
import copy
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOURCES, LAB = ROOT / "notebooks", ROOT / "notebooks" / "lab"
MARKERS = ("### BEGIN SOLUTION", "### END SOLUTION")


def tags(cell) -> list:
    return cell.get("metadata", {}).get("tags", [])


def is_solution(cell) -> bool:
    return bool(cell.get("metadata", {}).get("nbgrader", {}).get("solution"))


def sources() -> list:
    "The reading notebooks that have a lab edition: those with a cell tagged `lab`."
    return [p for p in sorted(SOURCES.glob("*.ipynb"))
            if any("lab" in tags(c) for c in nbformat.read(p, as_version=4).cells)]


def _header(path: Path, nb) -> nbformat.NotebookNode:
    title = next((c.source.splitlines()[0].lstrip("# ").strip() for c in nb.cells
                  if c.cell_type == "markdown" and c.source.startswith("# ")), path.stem)
    return nbformat.v4.new_markdown_cell(
        f"# Lab · {title}\n\n"
        f"The lab edition of [`{path.name}`](../{path.name}): the same components, written by you. Each cell "
        "that says `# YOUR CODE HERE` keeps its signature, docstring and shapes; replace "
        "`raise NotImplementedError()` with your code and run the checker in the cell after it (❌ until it "
        "passes, then ✅). The checkers switch off the library's own answer and the PyTorch built-ins that "
        "would solve the exercise outright, so the code that passes is yours. The reading edition explains "
        "every step; open it beside this one when you are stuck.\n\n"
        f"*Generated from `notebooks/{path.name}` by `tools/make_lab.py`: edit the source, not this file.*")


def _strip_directives(source: str) -> str:
    "Drop nbdev's `#| ...` directive lines (a lab notebook exports nothing)."
    return "\n".join(line for line in source.split("\n") if not line.startswith("#|")).strip("\n")


def _clean(cell) -> nbformat.NotebookNode:
    cell = copy.deepcopy(cell)
    cell.pop("id", None)
    cell.metadata.pop("execution", None)                  # run timestamps of the reading edition: not content
    if cell.cell_type == "code":
        cell.source, cell.outputs, cell.execution_count = _strip_directives(cell.source), [], None
    return cell


def lab_notebook(path: Path, clear: bool = True) -> nbformat.NotebookNode:
    "The lab edition of the reading notebook at `path`; clear=False keeps the reference solutions (markers dropped)."
    nb = nbformat.read(path, as_version=4)
    cells = [_clean(c) for c in nb.cells if "lab" in tags(c)]
    for c in cells:
        has_region = c.cell_type == "code" and MARKERS[0] in c.source
        if has_region != is_solution(c):
            raise ValueError(f"{path.name}: a cell {'with' if has_region else 'without'} a solution region must "
                             f"{'' if has_region else 'not '}have nbgrader metadata solution: true:\n{c.source[:200]}")
    lab = nbformat.v4.new_notebook(metadata={"kernelspec": nb.metadata.get("kernelspec", {}),
                                             "language_info": {"name": "python"}})
    lab.cells = [_header(path, nb)] + cells
    if clear:
        from nbgrader.preprocessors import ClearSolutions
        lab, _ = ClearSolutions(enforce_metadata=True).preprocess(lab, {})
    else:
        for c in lab.cells:
            if c.cell_type == "code":
                c.source = "\n".join(line for line in c.source.split("\n") if line.strip() not in MARKERS)
    for i, c in enumerate(lab.cells):                     # stable ids: the file is the same every time
        c.id = f"lab-{i:03d}"
    return lab


def write_all(check: bool = False) -> list:
    "Write (or, with check, compare) every lab notebook; returns the names that differ or are stale."
    LAB.mkdir(exist_ok=True)
    differ, wanted = [], set()
    for path in sources():
        target = LAB / path.name
        wanted.add(target.name)
        text = nbformat.writes(lab_notebook(path)) + "\n"
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            differ.append(target.name)
            if not check:
                target.write_text(text, encoding="utf-8")
    for stale in sorted(p for p in LAB.glob("*.ipynb") if p.name not in wanted):
        differ.append(stale.name)
        if not check:
            stale.unlink()
    return differ


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a lab notebook is out of date")
    args = parser.parse_args(argv)
    differ = write_all(check=args.check)
    if args.check and differ:
        print("out of date (run python tools/make_lab.py): " + ", ".join(differ), file=sys.stderr)
        return 1
    print(("would change: " if args.check else "written: ") + (", ".join(differ) or "nothing"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
