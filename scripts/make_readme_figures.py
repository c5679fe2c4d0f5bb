"""Copy figures from a report into docs/ for the README: python scripts/make_readme_figures.py RUN_DIR"""

import base64
import re
import sys
from pathlib import Path

run = Path(sys.argv[1] if len(sys.argv) > 1 else "siftlens_out")
html = (run / "report.html").read_text()
figs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
docs = Path(__file__).resolve().parents[1] / "docs"
for name, i in (("report_examples.png", 0), ("report_layer_curves.png", 1), ("report_effects.png", 2)):
    (docs / name).write_bytes(base64.b64decode(figs[i]))
    print("wrote", docs / name)
