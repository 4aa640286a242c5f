"""Keep the generated docs current: the config reference in README.md, and llm-docprompt.txt.

    python -m rafale.docprompt            rewrite both
    python -m rafale.docprompt --check    exit 1 if either is out of date (the tests run this)

llm-docprompt.txt is what an LLM needs to answer questions on using and extending rafale, in one message (at most
about 160 KB): the README (with the config reference), the model files in full (what a researcher changes
first), and for every other module its docstring and its outline: each public function's and class's signature
and docstring, dataclass fields, and the registries (short module-level dicts such as OPTIMIZERS). Function bodies
are left out, so editing one changes nothing here.
"""

import ast
import sys
from pathlib import Path

from rafale.config import config_reference

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
# the model files, in full: the nn.Modules a new attention, norm or position scheme changes
FULL_FILES = ("rafale/models/decoder.py", "rafale/models/encoder.py", "rafale/models/clip.py")
REGISTRY_LINES = 16  # a module-level constant this short is shown whole (registries, tables); a longer one by name


def readme_with_reference(readme: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{config_reference()}\n{END}{tail}"


def _docstring(node, indent: str, paragraph: bool = False) -> list[str]:
    """The node's docstring as source lines: its first sentence (a function's), or first paragraph (a class's)."""
    doc = ast.get_docstring(node)
    if not doc:
        return []
    first = doc.split("\n\n")[0]
    if not paragraph:
        end = first.find(". ")
        first = first if end < 0 else first[: end + 1]
    lines = first.splitlines()
    lines[-1] += '"""'
    return [f'{indent}"""{lines[0]}'] + [f"{indent}{line}".rstrip() for line in lines[1:]]


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef, indent: str) -> list[str]:
    decorators = [f"{indent}@{ast.unparse(d)}" for d in node.decorator_list]
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    kind = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return decorators + [f"{indent}{kind} {node.name}({ast.unparse(node.args)}){returns}:"]


def _public(name: str) -> bool:
    return not name.startswith("_") or name == "__init__"


def _outline_class(node: ast.ClassDef, source: str) -> list[str]:
    bases = ", ".join(ast.unparse(b) for b in node.bases + node.keywords)
    lines = [f"@{ast.unparse(d)}" for d in node.decorator_list]
    lines += [f"class {node.name}({bases}):" if bases else f"class {node.name}:"] + _docstring(node, "    ", paragraph=True)
    body = len(lines)
    for item in node.body:
        if isinstance(item, ast.AnnAssign):  # a dataclass field, with its default
            lines.append("    " + ast.get_source_segment(source, item).splitlines()[0])
        elif isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(item.name):
            lines += _signature(item, "    ") + (_docstring(item, "        ") or ["        ..."])
    return lines if len(lines) > body or ast.get_docstring(node) else lines + ["    ..."]


def _constant(node, name: str, source: str) -> str:
    """A registry (a short dict of names: OPTIMIZERS, POSITIONS, ...) or a one-line constant as written; any other
    constant by its name only."""
    segment = ast.get_source_segment(source, node)
    value = node.value
    registry = isinstance(value, ast.Dict) and all(isinstance(v, (ast.Name, ast.Attribute)) for v in value.values)
    if (registry and len(segment.splitlines()) <= REGISTRY_LINES) or len(segment.splitlines()) == 1 and len(segment) < 120:
        return segment
    return f"{name} = ...  # {len(segment.splitlines())} lines"


def outline(source: str) -> str:
    """A module without its function bodies: docstring, imports of rafale modules, signatures and docstrings of
    public functions, classes and methods, dataclass fields, and short module-level constants."""
    tree = ast.parse(source)
    parts = ['"""' + ast.get_docstring(tree) + '\n"""'] if ast.get_docstring(tree) else []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(node.name):
            parts.append("\n".join(_signature(node, "") + (_docstring(node, "    ") or ["    ..."])))
        elif isinstance(node, ast.ClassDef) and _public(node.name):
            parts.append("\n".join(_outline_class(node, source)))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            if names and all(n.isupper() and not n.startswith("_") for n in names):
                parts.append(_constant(node, names[0], source))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rafale"):
            parts.append(ast.unparse(node))
    return "\n\n".join(parts) + "\n"


def docprompt(readme: str) -> str:
    parts = [
        "# rafale: documentation and source code\n",
        "The README comes first (with the config reference), then the model files in full, then every other module "
        "of the `rafale` package as an outline: its docstring and its public signatures (function bodies left "
        "out; read the file for those).\n\n",
        "=" * 100 + "\nREADME.md\n" + "=" * 100 + "\n" + readme,
    ]
    paths = sorted((ROOT / "rafale").rglob("*.py"))
    for path in [p for p in paths if str(p.relative_to(ROOT)) in FULL_FILES]:
        parts.append("\n" + "=" * 100 + f"\n{path.relative_to(ROOT)} (in full)\n" + "=" * 100 + "\n" + path.read_text())
    for path in [p for p in paths if str(p.relative_to(ROOT)) not in FULL_FILES]:
        text = outline(path.read_text())
        if text.strip():
            parts.append("\n" + "=" * 100 + f"\n{path.relative_to(ROOT)} (outline)\n" + "=" * 100 + "\n" + text)
    return "".join(parts)


def main(argv=None) -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    readme_path, prompt_path = ROOT / "README.md", ROOT / "llm-docprompt.txt"
    readme = readme_with_reference(readme_path.read_text())
    prompt = docprompt(readme)
    stale = [p.name for p, text in ((readme_path, readme), (prompt_path, prompt))
             if not p.is_file() or p.read_text() != text]
    if check:
        if stale:
            print(f"out of date: {', '.join(stale)}; run python -m rafale.docprompt", file=sys.stderr)
        return 1 if stale else 0
    readme_path.write_text(readme)
    prompt_path.write_text(prompt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
