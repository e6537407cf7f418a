"""Fill the README syllabus's "runs in" column from a measured pytest --nbval run.

    .venv/bin/python -m pytest notebooks/ --junitxml=/tmp/nbval.xml     # or the whole suite
    python tools/notebook_times.py /tmp/nbval.xml                         # rewrites README.md in place
    python tools/notebook_times.py /tmp/nbval.xml --check                 # print only, change nothing

nbval reports every notebook cell as one test case; a notebook's time is the sum over its cells
(kernel start-up included in the first). Each syllabus row links its notebook, and the last column
of that row gets the notebook's time. A row whose notebook is missing from the report keeps its value.
"""
import argparse
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| \[[^\]]+\]\((notebooks/[^)]+\.ipynb)\)[^|]*\|(.*)\| ([^|]*) \|$")


def notebook_seconds(report: Path) -> dict:
    "Seconds per notebook (repo-relative path) summed over its nbval cells in a JUnit XML report."
    times = defaultdict(float)
    for case in ET.parse(report).getroot().iter("testcase"):
        cls = case.get("classname", "")            # nbval: "notebooks.02_rmsnorm.ipynb"
        if cls.endswith(".ipynb"):
            times[cls[: -len(".ipynb")].replace(".", "/") + ".ipynb"] += float(case.get("time", 0))
    return dict(times)


def human(seconds: float) -> str:
    s = round(seconds)
    return f"{s} s" if s < 90 else f"{s // 60} min {s % 60:02d} s"


def rewrite(readme: str, times: dict) -> tuple:
    "README text with each syllabus row's last column set from times; and the rows changed."
    lines, changed = readme.split("\n"), []
    for i, line in enumerate(lines):
        m = ROW.match(line)
        if m and m.group(1) in times:
            new = line[: m.start(3)] + human(times[m.group(1)]) + " |"
            if new != line:
                lines[i] = new
                changed.append((m.group(1), m.group(3).strip(), human(times[m.group(1)])))
    return "\n".join(lines), changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", type=Path, help="JUnit XML written by pytest --junitxml")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--check", action="store_true", help="print the times; leave README.md as it is")
    a = p.parse_args(argv)
    times = notebook_seconds(a.report)
    if not times:
        print(f"{a.report}: no notebook cells in this report (run pytest with --nbval)", file=sys.stderr)
        return 1
    for path, s in sorted(times.items()):
        print(f"{path:55} {human(s):>12}")
    text, changed = rewrite(a.readme.read_text(encoding="utf-8"), times)
    if not a.check:
        a.readme.write_text(text, encoding="utf-8")
        print(f"{a.readme.name}: {len(changed)} rows updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
