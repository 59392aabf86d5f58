"""The toolkit is an installable package: ``pip install .`` gives an importable ``llmasr`` from any
directory, the checkout's environment has it editable (local/setup.sh), and no script or test edits
``sys.path`` to find it."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO, SRC


def _sys_path_edits(path: Path):
    """Lines of ``path`` that change sys.path: sys.path.insert/append/extend/remove/..., an assignment
    to sys.path or one of its items, site.addsitedir."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value
            if node.func.attr == "addsitedir" and isinstance(target, ast.Name) and target.id == "site":
                found.append(node.lineno)
                continue
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            target = next((t.value if isinstance(t, ast.Subscript) else t for t in targets), None)
        if isinstance(target, ast.Attribute) and target.attr == "path" and isinstance(target.value, ast.Name) \
                and target.value.id == "sys":
            found.append(node.lineno)
    return sorted(found)


def test_sys_path_edit_detector_finds_each_form(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import sys, site\nsys.path.insert(0, 'a')\nsys.path.append('b')\nsys.path[:0] = ['c']\n"
                 "sys.path = ['d']\nsite.addsitedir('e')\nprint(sys.path)\nx = [1]\nx.append(2)\n")
    assert _sys_path_edits(f) == [2, 3, 4, 5, 6]


def test_no_sys_path_edits_in_src_local_tests():
    edits = {str(p.relative_to(REPO)): lines
             for folder in ("src", "local", "tests") for p in sorted((REPO / folder).rglob("*.py"))
             if (lines := _sys_path_edits(p))}
    assert not edits, f"sys.path edited at (file: lines) {edits}; import the installed llmasr package instead"


def _requirement(text: str):
    from packaging.requirements import Requirement

    r = Requirement(text)
    return r.name, r.specifier


def _project():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@pytest.mark.timeout(240)
def test_wheel_installs_and_imports_from_any_directory(tmp_path):
    """``pip install .``: the wheel built from a copy of the package's files holds every module of
    src/llmasr and the declared dependencies; installed into an empty directory it imports (with
    the environment's torch etc.) from a directory that is not the checkout."""
    tree = tmp_path / "tree"
    for name in ("pyproject.toml", "README.md", "LICENSE", "NOTICE"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tree / name)
    shutil.copytree(SRC / "llmasr", tree / "src" / "llmasr", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(tree)], check=True, capture_output=True, text=True, timeout=200)
    (wheel,) = wheels.glob("llmasr-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    modules = {str(p.relative_to(SRC)) for p in (SRC / "llmasr").rglob("*.py")}
    assert modules - names == set(), "modules missing from the wheel"
    requires = {_requirement(line.split(": ", 1)[1]) for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ") and "extra ==" not in line}
    assert requires == {_requirement(d) for d in _project()["dependencies"]}

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, text=True, timeout=200)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", "import llmasr, llmasr.recipes.train, llmasr.recipes.decode; "
                          "print(llmasr.__file__)"], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == (site / "llmasr" / "__init__.py").resolve()


def test_checkout_environment_has_the_package_editable(tmp_path):
    """local/setup.sh's ``pip install -e .``: a plain ``python`` of the environment, in any directory
    and without PYTHONPATH, imports this checkout's src/llmasr; the scripts' README commands run from
    elsewhere too."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import llmasr; print(llmasr.__file__)"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"llmasr is not installed in {sys.executable}: {out.stderr.strip()[-300:]}"
    assert Path(out.stdout.strip()).resolve() == (SRC / "llmasr" / "__init__.py").resolve(), (
        f"the environment's llmasr is {out.stdout.strip()}, not this checkout's: pip install -e {REPO}")
    help_ = subprocess.run([sys.executable, str(SRC / "score.py"), "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "usage:" in help_.stdout, help_.stderr


def test_requirements_install_the_package_with_its_extras():
    """requirements.txt (local/setup.sh) is the editable package with every extra it declares, so the
    dependency lists live in pyproject.toml only."""
    lines = [ln.split("#")[0].strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    editable = [ln for ln in lines if ln.startswith("-e ")]
    assert len(editable) == 1
    extras = set(editable[0].split("[", 1)[1].rstrip("]").split(","))
    declared = set(_project()["optional-dependencies"])
    assert extras == declared - {"whisper"}  # openai-whisper: --no-deps (local/setup.sh)
    assert "openai-whisper" in (REPO / "local" / "setup.sh").read_text()
