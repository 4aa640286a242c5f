"""Keep the generated docs current: the config reference in docs/config.md, the README's presets table (`rafale
models`), and llm-docprompt.txt.

    python -m rafale.commands.docprompt            rewrite them
    python -m rafale.commands.docprompt --check    exit 1 if one is out of date (the tests run this)

llm-docprompt.txt is what an LLM needs to answer questions on using and extending rafale, in one message (at most
about 160 KB, `MAX_BYTES`): the README, then the docs/ pages in the order the README links them (docs/config.md
with its config reference; the figures, `LEFT_OUT_PAGES`, stay in docs/), the decoder in full (what a researcher
changes first), and for every
other module its outline: the first paragraph of its docstring, each public function's and method's signature, a
class's first docstring line, and the registries (short module-level dicts such as OPTIMIZERS). Function bodies
and docstrings are left out, so editing one changes nothing here.
"""

import ast
import re
import sys
from pathlib import Path

from rafale.config import config_reference
from rafale.commands.models import markdown_table, preset_sizes

ROOT = Path(__file__).resolve().parents[2]
README, DOCS = "README.md", "docs"
REFERENCE_PAGE = "docs/config.md"  # the page that holds the generated config reference, between START and END
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
# the "Supported models" presets table: `rafale models` as markdown (rafale/commands/models.py)
PRESETS_START, PRESETS_END = "<!-- presets:start -->", "<!-- presets:end -->"
# in full: the decoder, what a new attention, norm or position scheme changes
FULL_FILES = ("rafale/models/decoder.py",)
# their docstring only: the commands (their use is their --help and the docs'), the CLI, the word and shape
# tables that make the built-in data, and the run's bookkeeping that a fork reads through the commands rather than
# calls (the record, keep_best and early stopping, the runs table and pictures, the hardware's peak FLOP/s, the
# console and metrics.jsonl, the Trainer's parts, the run's named steps and the run folder's helpers, whose
# docstrings say what they do)
DOCSTRING_ONLY = ("rafale/commands/",  # every command (a folder: a new command is in it at once)
                  "rafale/main.py", "rafale/data/stories.py", "rafale/data/shapes.py", "rafale/run_folder/arms.py",
                  "rafale/run/record.py", "rafale/run/outcomes.py", "rafale/run_folder/plots.py",
                  "rafale/run/hardware.py", "rafale/run/loggers.py", "rafale/run/trainer_parts.py",
                  "rafale/run/train.py", "rafale/run_folder/__init__.py", "rafale/run/branch.py", "rafale/run/ema.py",
                  "rafale/run/resilience.py", "rafale/run_folder/checkpoints.py", "rafale/run_folder/export_proof.py",
                  # the encoders and CLIP: HF's module trees ported class by class (their HF classes say the rest)
                  "rafale/models/encoder.py", "rafale/models/clip.py", "rafale/models/contrastive.py",
                  "rafale/data/image_text.py",
                  # the plumbing under the families' HF formats and the metrics (docs/models.md and
                  # docs/extending.md say how to use them)
                  "rafale/models/hf.py", "rafale/models/layout.py", "rafale/models/metrics.py", "rafale/models/bert.py",
                  "rafale/models/decoding.py")
# the figures, and the code that checks a figure by hand: no question on using rafale needs them
LEFT_OUT_PAGES = ("docs/speed.md", "docs/measurements.md", "docs/bits-per-byte.md")
# ...and the README's figures (the default job's, the studies') and its list of the pages that follow in the
# prompt anyway
LEFT_OUT_SECTIONS = {"README.md": ("What the default job shows", "What the studies here found", "Documentation")}
MAX_BYTES = 165_000  # "at most about 160 KB": what most LLMs take in one message
# the classes a fork subclasses or calls (model parts, datapipes, optimizers, metrics): with their methods; the
# run's and the commands' classes (callbacks, the record) by their name and first line
WITH_METHODS = ("rafale/models/", "rafale/data/", "rafale/run/optim.py", "rafale/models/metrics.py")
# ...but the encoders' and CLIP's module trees, ported from HF's class by class (every forward takes what HF's
# does): their classes by name and first line, which leaves room under MAX_BYTES for the decoder in full
WITHOUT_METHODS = ("rafale/models/encoder.py", "rafale/models/clip.py")
REGISTRY_LINES = 16  # a module-level constant this short is shown whole (registries, tables); a longer one by name


def with_reference(page: str) -> str:
    """The page with the config reference between its START and END markers regenerated from rafale/config.py."""
    return between(page, START, END, config_reference())


def with_presets(readme: str) -> str:
    """The README with its presets table between PRESETS_START and PRESETS_END: `rafale models` as markdown."""
    return between(readme, PRESETS_START, PRESETS_END, markdown_table(preset_sizes()))


def between(text: str, start: str, end: str, content: str) -> str:
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{content}\n{end}{tail}"


def doc_pages(root: Path = ROOT) -> list[str]:
    """The docs/ pages in the order the README's "Documentation" section lists them, then any page it does not
    list, by name."""
    readme = (root / README).read_text()
    listing = readme.split("\n## Documentation\n", 1)[-1].split("\n## ", 1)[0]
    listed = re.findall(r"\]\((docs/[\w.-]+\.md)\)", listing)
    pages = sorted(str(p.relative_to(root)) for p in (root / DOCS).glob("*.md"))
    return [p for p in dict.fromkeys(listed) if p in pages] + [p for p in pages if p not in listed]


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


def _outline_class(node: ast.ClassDef, source: str, methods: bool = True, fields: bool = True) -> list[str]:
    bases = ", ".join(ast.unparse(b) for b in node.bases + node.keywords)
    lines = [f"@{ast.unparse(d)}" for d in node.decorator_list]
    lines.append(f"class {node.name}({bases}):" if bases else f"class {node.name}:")
    doc = (ast.get_docstring(node) or "").split("\n")[0]
    lines += [f'    """{doc}"""'] if doc else []
    for item in node.body:
        if fields and isinstance(item, ast.AnnAssign) and any(isinstance(d, ast.Name) and d.id == "dataclass" or
                                                   "dataclass" in ast.unparse(d) for d in node.decorator_list):
            lines.append(f"    {ast.unparse(item.target)}: {ast.unparse(item.annotation)}")  # a dataclass field
        elif methods and isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(item.name):
            lines += _signature(item, "    ")
    return lines


def _constant(node, name: str, source: str) -> str:
    """A registry (a short dict of names: OPTIMIZERS, POSITIONS, ...) or a one-line constant as written; any other
    constant by its name only."""
    segment = ast.get_source_segment(source, node)
    value = node.value
    registry = isinstance(value, ast.Dict) and all(isinstance(v, (ast.Name, ast.Attribute)) for v in value.values)
    if (registry and len(segment.splitlines()) <= REGISTRY_LINES) or len(segment.splitlines()) == 1 and len(segment) < 120:
        return segment
    return f"{name} = ...  # {len(segment.splitlines())} lines"


def outline(source: str, signatures: bool = True, methods: bool = True, fields: bool = True) -> str:
    """A module without its function bodies: the first paragraph of its docstring, signatures of public functions,
    classes and (`methods`) their methods, (`fields`) dataclass fields, and short module-level constants (`signatures` False:
    the first paragraph of its docstring only). Its imports are left out: the README's map gives the layers."""
    tree = ast.parse(source)
    doc = ast.get_docstring(tree)
    parts = ['"""' + doc.split("\n\n")[0] + '"""'] if doc else []
    for node in tree.body if signatures else ():
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(node.name):
            parts.append("\n".join(_signature(node, "")))
        elif isinstance(node, ast.ClassDef) and _public(node.name):
            parts.append("\n".join(_outline_class(node, source, methods, fields)))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            if names and all(n.isupper() and not n.startswith("_") for n in names):
                parts.append(_constant(node, names[0], source))
    return "\n".join(parts) + "\n"


def without_sections(page: str, titles) -> str:
    """The page less its `## <title>` sections, each replaced by a line saying where it is."""
    parts = page.split("\n## ")
    kept = [parts[0]]
    for part in parts[1:]:
        title = part.split("\n", 1)[0].strip()
        kept.append(f"{title}\n\n(in README.md)\n" if title in titles else part)
    return "\n## ".join(kept)


def docprompt(pages: dict[str, str]) -> str:
    """llm-docprompt.txt from the README and the docs/ pages (`pages`: path -> text, README first, in reading order)
    and the package's source."""
    parts = [
        "# rafale: documentation and source code\n",
        "The README comes first, then the docs/ pages (docs/config.md with the config reference), then the decoder "
        "in full, then every other module "
        "of the `rafale` package as an outline: its docstring's first paragraph and its public signatures (bodies "
        "left out; read the file for those; a command's module, whose use is its --help, by its docstring alone). "
        "Each file starts with a `#### path` line.\n\n",
    ]
    for name, text in pages.items():
        title = text.split("\n", 1)[0]
        text = f"{title}\n\n(figures: read {name})\n" if name in LEFT_OUT_PAGES else text
        parts.append(f"\n#### {name}\n" + without_sections(text, LEFT_OUT_SECTIONS.get(name, ())))
    paths = sorted((ROOT / "rafale").rglob("*.py"))
    for path in [p for p in paths if str(p.relative_to(ROOT)) in FULL_FILES]:
        parts.append(f"\n#### {path.relative_to(ROOT)} (in full)\n" + path.read_text())
    for path in [p for p in paths if str(p.relative_to(ROOT)) not in FULL_FILES]:
        name = str(path.relative_to(ROOT))
        text = outline(path.read_text(), signatures=not name.startswith(DOCSTRING_ONLY), methods=name.startswith(WITH_METHODS) and name not in WITHOUT_METHODS,
                       fields=name != "rafale/config.py")  # the config's fields: in docs/config.md's reference
        parts.append(f"\n#### {name}\n" + (text if text.strip() else "(no docstring or public names)\n"))
    return "".join(parts)


def current_pages() -> dict[str, str]:
    """README.md and the docs/ pages as they should read: the README's presets table and docs/config.md's reference
    regenerated."""
    pages = {name: (ROOT / name).read_text() for name in [README, *doc_pages()]}
    pages[README] = with_presets(pages[README])
    pages[REFERENCE_PAGE] = with_reference(pages[REFERENCE_PAGE])
    return pages


def main(argv=None) -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    pages = current_pages()
    generated = ((ROOT / README, pages[README]), (ROOT / REFERENCE_PAGE, pages[REFERENCE_PAGE]),
                 (ROOT / "llm-docprompt.txt", docprompt(pages)))
    stale = [str(p.relative_to(ROOT)) for p, text in generated if not p.is_file() or p.read_text() != text]
    if check:
        if stale:
            print(f"out of date: {', '.join(stale)}; run python -m rafale.commands.docprompt", file=sys.stderr)
        return 1 if stale else 0
    for path, text in generated:
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
