"""Copy a figure from a notebook's stored outputs into a PNG file (for the README).

    python tools/notebook_figure.py notebooks/08_quantization.ipynb "ax.scatter" data/figures/quantization.png

Takes the first image/png output of the first code cell whose source contains MARKER. The notebook's
outputs come from its last execution (nbval checks them), so the figure is the notebook's own result.
"""
import base64
import json
import sys
from pathlib import Path


def extract(notebook: Path, marker: str, out: Path) -> Path:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    for cell in cells:
        if cell["cell_type"] == "code" and marker in "".join(cell["source"]):
            for output in cell.get("outputs", []):
                png = output.get("data", {}).get("image/png")
                if png:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(base64.b64decode(png))
                    return out
            raise ValueError(f"{notebook}: the cell with {marker!r} has no stored PNG output; execute the notebook")
    raise ValueError(f"{notebook}: no code cell contains {marker!r}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    print(extract(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])))
