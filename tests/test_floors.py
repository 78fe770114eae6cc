"""The three floors of docs/architecture.md: eplb imports nothing of lplb, lplb may import eplb."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_eplb_loads_no_lplb_module() -> None:
    code = (
        "import sys, eplb\n"
        "bad = sorted(m for m in sys.modules if m == 'lplb' or m.startswith('lplb.'))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_no_eplb_module_imports_lplb() -> None:
    """Also imports inside functions, which the import test above would not reach."""
    offenders = []
    for path in sorted((ROOT / "eplb").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "lplb"]
    assert offenders == []


def test_each_package_has_its_own_extension() -> None:
    import eplb._C
    import lplb._C

    assert Path(eplb._C.__file__).parent.name == "eplb"
    assert Path(lplb._C.__file__).parent.name == "lplb"
    assert hasattr(eplb._C, "eplb_deepseek") and not hasattr(lplb._C, "eplb_deepseek")
