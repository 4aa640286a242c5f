"""The package's shape: imports run one way, through the layers of LAYERS (the README's "Hacking on rafale" states
the same line), every module in exactly one layer, the folder it lives in; nothing imports the CLI, a model file loads torch and itself
only, the CLI answers --help and config errors without torch or Composer, and no function runs past a screen
without saying why."""

import ast
import functools
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


@functools.cache  # parsed once for the file's tests (which only read the trees)
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


@functools.cache
def package_imports() -> dict[str, frozenset[str]]:
    trees = modules()
    return {name: frozenset(rafale_imports(tree, set(trees))) for name, tree in trees.items()}


def import_graph() -> dict[str, set[str]]:
    """Each rafale module -> the rafale modules it imports (a fresh copy: a test may add an arrow)."""
    return {name: set(imported) for name, imported in package_imports().items()}


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
    assert "rafale.config" in graph and "rafale.resolve" in graph["rafale.run.train"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_imports_the_cli():
    importers = [name for name, deps in import_graph().items() if "rafale.main" in deps and name not in CLI_ENTRY_POINTS]
    assert importers == []


# The layers, lowest first, by folder: a module's layer is where it lives, and it imports from its own layer or a
# lower one only. A name ending in "." is a folder: every module in it belongs there (a new family, datapipe, part
# of the run or command is one file, no line here). rafale/'s top level holds the leaves, config, resolve and the
# CLI, and nothing else (TOP_LEVEL). "models | data" is one layer of two halves that never import each other.
LAYERS = {
    "errors": {"rafale", "rafale.errors", "rafale.progress",  # (progress: what a long stage says, a leaf)
               "rafale.stats"},  # (stats: a mean's interval, a difference's test; numbers in, numbers out)
    "config": {"rafale.config"},
    "models | data": {"rafale.models.", "rafale.data."},
    "resolve": {"rafale.resolve"},
    "the run folder": {"rafale.run_folder."},
    "the run": {"rafale.run."},
    "the commands": {"rafale.commands."},
    "main": {"rafale.main", "rafale.__main__", "rafale.main.__main__"},
}
TOP_LEVEL = {m for members in LAYERS.values() for m in members if m.count(".") < 2 and not m.endswith(".")}
FOLDERS = {m for members in LAYERS.values() for m in members if m.endswith(".")}
# where a module that is none of TOP_LEVEL goes, by what it is
WHERE_IT_GOES = ("a command in rafale/commands/, a part of the training run in rafale/run/, what reads or writes a run "
                 "folder in rafale/run_folder/, a model part or metric in rafale/models/, a data source or "
                 "generator in rafale/data/")
HALVES = {"models": ("rafale.models",), "data": ("rafale.data",)}
LAYERING = " -> ".join(LAYERS)
# what a command may not import: the run's machinery (a command reads a run through rafale.run_folder; the
# optimizers' check, the cooldowns' names and the machine's peak are the run's it may ask)
THE_RUNS_INSIDES = {"rafale.run.train", "rafale.run.record", "rafale.run.loggers", "rafale.run.outcomes",
                    "rafale.run.resilience"}


def in_package(name: str, package: str) -> bool:
    return name == package.rstrip(".") or name.startswith(package)


def layer_of(name: str) -> list[str]:
    """The layers `name` is listed in (by its name, or by its package)."""
    return [layer for layer, members in LAYERS.items()
            if name in members or any(m.endswith(".") and in_package(name, m) for m in members)]


def half_of(name: str) -> str | None:
    return next((half for half, packages in HALVES.items() if any(in_package(name, p) for p in packages)), None)


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    """Every import that climbs: into a higher layer, across the models | data halves, or from a command into the
    run's machinery."""
    order = list(LAYERS)
    found = []
    for name, deps in sorted(graph.items()):
        for dep in sorted(deps):
            (mine,), (theirs,) = layer_of(name), layer_of(dep)
            if order.index(theirs) > order.index(mine):
                found.append(f"{name} ({mine}) imports {dep} ({theirs})")
            elif mine == theirs == "models | data" and half_of(name) != half_of(dep):
                found.append(f"{name} ({half_of(name)}) imports {dep} ({half_of(dep)})")
            elif mine == "the commands" and dep in THE_RUNS_INSIDES:
                found.append(f"{name} (a command) imports {dep} (the run's insides; read the run folder instead)")
    return found


def test_every_module_is_in_exactly_one_layer():
    names = set(modules())
    assert len(names) >= 40 and "rafale.run_folder" in names
    placed = {name: layer_of(name) for name in sorted(names)}
    assert {name: layers for name, layers in placed.items() if len(layers) != 1} == {}
    listed = [m for members in LAYERS.values() for m in members]
    assert len(listed) == len(set(listed))
    assert [m for m in listed if not m.endswith(".") and m not in names] == []  # no stale names
    assert [m for m in FOLDERS if not (PACKAGE / m.removeprefix("rafale.").rstrip(".")).is_dir()] == []
    assert layer_of("rafale.new_module") == [] and layer_of("rafale.models.new_family") == ["models | data"]
    assert layer_of("rafale.commands.compare") == ["the commands"] and layer_of("rafale.run.new_part") == ["the run"]


def misplaced(names: set[str]) -> list[str]:
    """The modules at rafale/'s top level that are not TOP_LEVEL's, each with where it should go: the layers are
    folders, so a module's place says its layer."""
    return [f"rafale/{name.removeprefix('rafale.')}.py is at rafale/'s top level, which holds only {top_level_files()}: "
            f"put {WHERE_IT_GOES}"
            for name in sorted(names) if name.count(".") == 1 and name not in TOP_LEVEL and f"{name}." not in FOLDERS]


def top_level_files() -> str:
    return ", ".join(sorted(f"{name.removeprefix('rafale.')}.py" for name in TOP_LEVEL if name != "rafale"))


def test_a_new_module_at_the_top_level_is_told_which_folder_it_belongs_in():
    assert TOP_LEVEL == {"rafale", "rafale.errors", "rafale.progress", "rafale.stats", "rafale.config",
                         "rafale.resolve", "rafale.main", "rafale.__main__"}
    assert misplaced({"rafale.compare", "rafale.commands.compare", "rafale.config"}) == [
        f"rafale/compare.py is at rafale/'s top level, which holds only {top_level_files()}: put {WHERE_IT_GOES}"]
    assert misplaced(set(modules())) == []


def test_the_layers_run_one_way():
    """errors -> config -> models | data -> resolve -> the run folder -> the run -> the commands -> main."""
    graph = import_graph()
    assert graph["rafale.errors"] == set()
    assert wrong_way(graph) == []


@pytest.mark.parametrize("importer, imported", [
    ("rafale.run.loggers", "rafale.commands.runs"),  # the run importing a command (the run folder's names were in export.py
    ("rafale.run.record", "rafale.commands.export"),  # and plots.py: record.py, run_folder.py, train.py and loggers.py
    ("rafale.run_folder", "rafale.commands.export"),  # imported the commands for them)
    ("rafale.run.train", "rafale.commands.export"),
    ("rafale.commands.sweep", "rafale.run.record"),  # a command importing the run's insides
    ("rafale.config", "rafale.run.optim"),  # the config building an optimizer
    ("rafale.models.pythia", "rafale.data.tokenizers"),  # a model importing the data
    ("rafale.models.metrics", "rafale.data.tokenizers"),  # ... through the metrics
    ("rafale.data.cache", "rafale.models.families"),  # the data importing a model
    ("rafale.run_folder", "rafale.run.record"),
])
def test_the_layer_check_finds_each_arrow_that_climbed(importer, imported):
    graph = import_graph()
    assert imported not in graph[importer]
    graph[importer] = graph[importer] | {imported}
    assert [line for line in wrong_way(graph) if line.startswith(f"{importer} ")] != []


def test_the_readme_states_the_same_layers():
    readme = (ROOT / "README.md").read_text()
    assert f"Imports run one way: {LAYERING}." in readme


def test_config_validation_imports_neither_torch_nor_the_optimizers():
    """Loading and checking a config is quick: the optimizer's own check (it builds one) comes after, on the road
    that trains (rafale.run.optim.check_optimizer)."""
    result = loaded_after("from rafale.config import load_config\nload_config('test/pythia_debug.yaml')")
    assert [m for m in result["modules"] if m.split(".")[0] in ("torch", "composer")] == []
    assert "rafale.run.optim" not in result["modules"]


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
    """The decoder, its CPU decoding helper (rafale/models/decoding.py), its KV cache (kv_cache.py), its chunked
    loss (chunked_loss.py), muP's rules (mup.py) and generation's sampling (sampling.py), parts of it kept apart,
    load torch and rafale's shared errors,
    nothing else of rafale's."""
    loaded = set(loaded_after("import rafale.models.decoder")["modules"])
    assert "torch" in loaded and not any(m.startswith("composer") for m in loaded)
    assert {m for m in loaded if m.startswith("rafale")} == {"rafale", "rafale.errors", "rafale.models",
                                                             "rafale.models.decoder", "rafale.models.decoding",
                                                             "rafale.models.chunked_loss", "rafale.models.kv_cache",
                                                             "rafale.models.mup", "rafale.models.sampling"}
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


# a module a reader takes in whole: the generators' word and shape tables and the config's help texts (the
# reference) are the exceptions
LONG_MODULES_ALLOWED = {"rafale/config.py", "rafale/data/stories.py", "rafale/data/shapes.py"}
MAX_MODULE_LINES = 600


def test_no_module_is_over_600_lines_but_the_generators_and_the_config():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert set(long) <= LONG_MODULES_ALLOWED, {k: v for k, v in long.items() if k not in LONG_MODULES_ALLOWED}
