"""The package's shape: imports run one way (errors -> config -> models -> datapipes -> commands -> main), nothing
imports the CLI, a model file loads torch and itself only, the CLI answers --help and config errors without torch
or Composer, and no function runs past a screen without saying why."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "rafale"
MAX_FUNCTION_LINES = 60
CLI_ENTRY_POINTS = {"rafale.__main__", "rafale.main.__main__"}  # `python -m rafale`, `python rafale/main`


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def in_type_checking_block(node, parents) -> bool:
    """`if TYPE_CHECKING:` imports are for annotations only: they never run."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def rafale_imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The rafale modules `tree` imports, at module level or inside functions (`from rafale.x import y` counts as
    rafale.x.y when that is a module, else rafale.x)."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if in_type_checking_block(node, parents):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "rafale"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rafale":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known and m != "rafale"}


def import_graph() -> dict[str, set[str]]:
    trees = modules()
    return {name: rafale_imports(tree, set(trees)) for name, tree in trees.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    tree = ast.parse("import rafale.x\ndef f():\n    from rafale.y import z\n"
                     "if TYPE_CHECKING:\n    from rafale.w import v\n")
    assert rafale_imports(tree, {"rafale.x", "rafale.y", "rafale.y.z", "rafale.w"}) == {"rafale.x", "rafale.y.z"}


def test_the_package_imports_have_no_cycle():
    graph = import_graph()
    assert "rafale.config" in graph and "rafale.resolve" in graph["rafale.train"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_imports_the_cli():
    importers = [name for name, deps in import_graph().items() if "rafale.main" in deps and name not in CLI_ENTRY_POINTS]
    assert importers == []


MODEL_LAYER = ("rafale.models", "rafale.errors", "rafale.metrics")  # (metrics: the models' Composer metrics)


def test_the_layers_run_one_way():
    """errors imports nothing of rafale; config imports no model; the models import nothing from the data, the run
    or the commands; the data imports no model."""
    graph = import_graph()
    assert graph["rafale.errors"] == set()
    assert {d for d in graph["rafale.config"] if d.startswith("rafale.models")} == set()
    models = [name for name in graph if name.startswith("rafale.models")]
    data = [name for name in graph if name.startswith("rafale.data")]
    assert len(models) >= 10 and len(data) >= 8  # (the walk found the packages)
    for name in models:
        outside = {d for d in graph[name] if not d.startswith(MODEL_LAYER)}
        assert outside == set(), f"{name} imports {sorted(outside)}"
    for name in data:
        assert {d for d in graph[name] if d.startswith("rafale.models")} == set(), name


def family_name_comparisons(tree: ast.Module, names: set[str], anywhere: bool) -> list[str]:
    """`x == "pythia"`-like comparisons: of model.type (or a model_type) with a family's name, or, when
    `anywhere`, of anything with one."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        literals = {c.value for side in sides for c in ast.walk(side) if isinstance(c, ast.Constant)}
        if literals & names and (anywhere or "type" in ast.unparse(node)):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_compares_model_type_to_a_family_name():
    """The families are asked (rafale/models/families.py), never named. Only a family's own files tell its members
    apart (BERT from RoBERTa, CLIP from SigLIP), and never by model.type."""
    from rafale.models.families import FAMILIES

    names = set(FAMILIES)
    assert family_name_comparisons(ast.parse('if cfg.model.type != "pythia": pass'), names, anywhere=False)
    assert family_name_comparisons(ast.parse('ok = fmt.family in ("clip", "siglip")'), names, anywhere=True)
    found = {}
    for name, tree in modules().items():
        hits = family_name_comparisons(tree, names, anywhere=not name.startswith("rafale.models"))
        if hits:
            found[name] = hits
    assert found == {}


def loaded_after(code: str) -> dict:
    """Which rafale modules, and whether torch and composer, are in sys.modules after `code` runs in a fresh
    interpreter (its exit status too: the CLI exits)."""
    probe = f"""
import json, sys
code = 0
try:
{chr(10).join('    ' + line for line in code.splitlines())}
except SystemExit as stop:
    code = stop.code
print(json.dumps({{"modules": sorted(m for m in sys.modules if m.split(".")[0] in ("rafale", "torch", "composer")
                                     and m.count(".") < 3), "code": code}}))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_model_file_loads_torch_and_itself_only():
    """The decoder and its CPU decoding helper (rafale/models/decoding.py, a part of it kept apart) load torch and
    rafale's shared errors, nothing else of rafale's."""
    loaded = set(loaded_after("import rafale.models.decoder")["modules"])
    assert "torch" in loaded and not any(m.startswith("composer") for m in loaded)
    assert {m for m in loaded if m.startswith("rafale")} == {"rafale", "rafale.errors", "rafale.models",
                                                             "rafale.models.decoder", "rafale.models.decoding"}
    loaded = set(loaded_after("import rafale.models.decoding")["modules"])
    assert {m for m in loaded if m.startswith("rafale")} == {"rafale", "rafale.models", "rafale.models.decoding"}
    import rafale.models

    assert rafale.models.from_pretrained.__module__ == "rafale.models.hf"  # still there, loaded when asked for


@pytest.mark.parametrize("argv,code", [(["--help"], 0), (["-c", "test/pythia_debug.yaml", "training.lrr=3e-3"], 2)],
                         ids=["help", "config-error"])
def test_help_and_config_errors_answer_without_torch_or_composer(argv, code):
    result = loaded_after(f"from rafale.main import main\nmain({argv!r})")
    assert result["code"] == code
    heavy = [m for m in result["modules"] if m.split(".")[0] in ("torch", "composer")]
    assert heavy == []


def test_no_function_is_longer_than_a_screen_without_saying_why():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if lines > MAX_FUNCTION_LINES and "long because" not in doc.lower():
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert too_long == [], f"over {MAX_FUNCTION_LINES} lines without 'long because' in the docstring: {too_long}"


TIME_STRINGS = ["1ep", "2ep", "10ba", "0ba", "0.05dur", "1dur", "3e4tok", "1000000tok", "8sp", "5iter", "7sec",
                "1.5ep", "1.0ba", "-1ba", ".5dur", "2e-1dur", "1e3ba", "ep", "1", "1 ep", "1EP", "1 ba", "abc",
                "10bar", "", "1ep2", "0.1dur ", " 2ep", "+3ba", "1h", "1h30m0s", "nan ba", "inf ep"]


@pytest.mark.parametrize("text", TIME_STRINGS)
def test_the_config_time_parser_agrees_with_composer(text):
    from composer.core import Time

    from rafale.config import parse_time

    try:
        theirs = Time.from_timestring(text)
        theirs = (theirs.value, theirs.unit.value)
    except (ValueError, TypeError, OverflowError):  # (Composer's int(float('inf')) overflows)
        theirs = None
    try:
        ours = parse_time(text)
    except ValueError:
        ours = None
    if theirs is not None and theirs[1] == "sec" and not text.strip().lower().endswith("sec"):
        assert ours is None  # Composer's wall-clock form ('1h', '1', ''), which no rafale setting takes
        return
    assert ours == theirs
    if ours is not None:
        assert type(ours[0]) is type(theirs[0])  # noqa: E721 (int for counts, float for dur)
