"""Keep the generated docs current: the config reference in README.md, and llm-docprompt.txt.

    python -m rafale.docprompt            rewrite both
    python -m rafale.docprompt --check    exit 1 if either is out of date (the tests run this)

llm-docprompt.txt is the README followed by every source file of the package, for pasting into an LLM.
"""

import sys
from pathlib import Path

from rafale.config import config_reference

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def readme_with_reference(readme: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{config_reference()}\n{END}{tail}"


def docprompt(readme: str) -> str:
    parts = [
        "# rafale: documentation and source code\n",
        "The README comes first, then each file of the `rafale` package.\n\n",
        "=" * 100 + "\nREADME.md\n" + "=" * 100 + "\n" + readme,
    ]
    for path in sorted((ROOT / "rafale").rglob("*.py")):
        parts.append("\n" + "=" * 100 + f"\n{path.relative_to(ROOT)}\n" + "=" * 100 + "\n" + path.read_text())
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
