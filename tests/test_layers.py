"""The layers: imports run one way (node → training → storage), the training package
keeps the model apart from inference and from training, and no modules import each other
in a circle. The contracts live in pyproject.toml; import-linter checks them.

`python -m tests.test_layers` prints the import graph between packages.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("node", "training", "storage")


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "5 kept, 0 broken" in result.stdout


def package_graph() -> dict[tuple[str, str], list[str]]:
    """(importer, imported) package pairs → the module imports behind each."""
    import grimp

    graph = grimp.build_graph(*PACKAGES)
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            pair = (module.split(".")[0], imported.split(".")[0])
            if pair[0] != pair[1]:
                edges[pair].append(f"{module} -> {imported}")
    return dict(edges)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    for (importer, imported), lines in sorted(package_graph().items()):
        print(f"{importer} -> {imported}: {len(lines)} imports")
        for line in lines:
            print(f"    {line}")
