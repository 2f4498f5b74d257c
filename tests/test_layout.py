"""The repository's shape: a slim bundle (only what its configs run, plus the data-preparation command lines) and
no unit too long to read in one sitting."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
SCRIPTS = BUNDLE / "scripts"
#: the data-preparation command lines that ship with the bundle although no config imports them
DATA_PREP_CLIS = ("synthetic", "prepare_cohort", "check_data", "prepare_fairseg", "prepare_ham10000")
#: while the DICOM node is being moved to deploy/ and split (issue 18, node part), its old file may still be here;
#: once it is gone this clause does nothing and can be deleted
MOVING_OUT = {SCRIPTS / "dicom_node.py"}
MAX_FUNCTION_LINES, MAX_CLASS_LINES, MAX_EXCEPTIONS = 120, 300, 3
SCRIPT_REF = re.compile(r"\bscripts\.([A-Za-z_]\w*)")


def _config_modules() -> dict[str, set[str]]:
    """Module of ``scripts`` -> the config files that name it (``_target_`` paths and ``$`` expressions)."""
    named: dict[str, set[str]] = {}
    for path in sorted((BUNDLE / "configs").rglob("*.json")):
        for module in SCRIPT_REF.findall(path.read_text()):  # in _target_ paths and $ expressions alike
            named.setdefault(module, set()).add(path.name)
    return named


def _imported_modules(path: Path, exports: dict[str, str]) -> set[str]:
    """Modules of ``scripts`` that a module imports, at the top or inside functions, absolutely or relatively."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("scripts.")}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 and module:
                found.add(module.split(".")[0])
            elif node.level == 1 or (node.level == 0 and module == "scripts"):  # from . / scripts import name
                found |= {exports.get(a.name, a.name) for a in node.names}
            elif node.level == 0 and module.startswith("scripts."):
                found.add(module.split(".")[1])
    return found


def _script_files() -> dict[str, Path]:
    return {p.stem: p for p in SCRIPTS.glob("*.py") if p not in MOVING_OUT}


def test_bundle_scripts_hold_only_config_imports_and_data_prep_clis():
    import scripts

    files = _script_files()
    nested = [str(p.relative_to(SCRIPTS)) for p in SCRIPTS.rglob("*.py") if p.parent != SCRIPTS]
    assert not nested, f"bundle/scripts/ is one flat package; move {nested} up or out of the bundle"
    from_configs = _config_modules()
    unknown = {m: sorted(c) for m, c in from_configs.items() if m not in files}
    assert not unknown, f"configs name scripts modules that do not exist: {unknown}"
    reached, todo = set(), [*from_configs, *DATA_PREP_CLIS]
    while todo:
        module = todo.pop()
        if module in reached or module not in files:
            continue
        reached.add(module)
        todo += sorted(_imported_modules(files[module], scripts._EXPORTS))
    stray = sorted(set(files) - reached - {"__init__"})
    assert not stray, (
        f"bundle/scripts/ holds {stray}, which no config imports (directly or through another bundle module) and no "
        f"data-preparation command line ({', '.join(DATA_PREP_CLIS)}) uses: move them to tools/ or deploy/"
    )
    assert "synthetic_dicom" in reached and "dicom_write" in reached  # both writers are reached: the walk works


def _long_units() -> dict[str, int]:
    """``"<path>::<name>"`` -> length in lines of every function over 120 and class over 300 lines."""
    sources = [*_script_files().values(), *sorted((REPO / "deploy").rglob("*.py"))]
    long = {}
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    long[f"{path.relative_to(REPO).as_posix()}::{node.name}"] = length
    return long


def _listed_exceptions() -> dict[str, str]:
    """The exceptions listed in the README's layout section: ``- `path::Name`: reason`` lines."""
    readme = (REPO / "README.md").read_text()
    match = re.search(r"^## Layout\n(.*?)(?=^## )", readme, flags=re.M | re.S)
    assert match, "README.md has no '## Layout' section"
    return dict(re.findall(r"^- `([\w/.]+::\w+)`: (.+)$", match.group(1), flags=re.M))


def test_no_unit_is_too_long_except_the_listed_ones():
    listed = _listed_exceptions()
    assert len(listed) <= MAX_EXCEPTIONS, f"at most {MAX_EXCEPTIONS} exceptions, the README lists {sorted(listed)}"
    assert all(len(reason.split()) >= 5 for reason in listed.values()), "each exception needs a one-line reason"
    long = _long_units()
    unlisted = {unit: n for unit, n in long.items() if unit not in listed}
    assert not unlisted, (
        f"functions over {MAX_FUNCTION_LINES} or classes over {MAX_CLASS_LINES} lines: {unlisted}; split them "
        "along their seams"
    )
    stale = sorted(set(listed) - set(long))
    assert not stale, f"the README lists {stale} as too long, but they are within the limits now: remove them"


@pytest.mark.parametrize("source", ["def f():\n" + "    x = 1\n" * 120, "class C:\n" + "    x = 1\n" * 300])
def test_the_length_check_counts_what_it_should(tmp_path, source, monkeypatch):
    """A 121-line function and a 301-line class are found; the same one line shorter is not."""
    module = tmp_path / "deploy" / "m.py"
    module.parent.mkdir()
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    monkeypatch.setattr(__import__(__name__), "_script_files", dict)
    module.write_text(source)
    assert list(_long_units().values()) == [source.count("\n")]
    module.write_text(source.rsplit("    x = 1\n", 1)[0])
    assert _long_units() == {}
