import re

from rafale.docprompt import (MAX_BYTES, PRESETS_END, PRESETS_START, ROOT, docprompt, main, outline,
                               readme_with_reference)
from rafale.main import COMMANDS


def test_readme_reference_and_llm_docprompt_are_current():
    # fails when a config field, its help, the README or a public signature changed without regenerating
    assert main(["--check"]) == 0, "run: python -m rafale.docprompt"


def test_llm_docprompt_fits_in_one_message():
    size = len((ROOT / "llm-docprompt.txt").read_bytes())
    assert 60_000 < size <= MAX_BYTES, size


def test_editing_a_function_body_outside_the_full_files_changes_nothing():
    """A fix inside a function of train.py (not shown in full) leaves llm-docprompt.txt as it is; a new public
    function does not."""
    source = (ROOT / "rafale" / "train.py").read_text()
    name = "def datapipe_for("
    body_start = source.index('"""', source.index('"""', source.index(name)) + 3) + 3  # after its docstring
    edited = source[:body_start] + "\n    _unused = 1 + 1  # an edit of the body" + source[body_start:]
    assert outline(edited) == outline(source)
    edited = source[:body_start] + "\n    x = 1\n    return x" + source[body_start:]
    assert outline(edited) == outline(source)
    assert outline(source + "\n\ndef brand_new(x: int) -> int:\n    return x\n") != outline(source)


def test_the_docprompt_holds_the_readme_the_decoder_and_every_module():
    readme = readme_with_reference((ROOT / "README.md").read_text())
    text = docprompt(readme)
    assert "## Hacking on rafale" in text and "class ALiBi(Positions)" in text  # the README and its recipes
    assert (ROOT / "rafale" / "models" / "decoder.py").read_text() in text
    for path in sorted((ROOT / "rafale").rglob("*.py")):
        assert f"#### {path.relative_to(ROOT)}\n" in text or f"#### {path.relative_to(ROOT)} (in full)\n" in text, path


def test_readme_lists_configs_that_exist():
    readme = (ROOT / "README.md").read_text()
    for path in set(re.findall(r"test/[\w.-]+\.yaml", readme)):
        assert (ROOT / path).is_file(), path


def test_readme_lists_the_commands_of_rafale_help():
    readme = (ROOT / "README.md").read_text()
    listed = re.search(r"`rafale --help` lists every command \(([^)]*)\)", readme).group(1)
    assert re.findall(r"`([\w-]+)`", listed) == sorted(COMMANDS)


def test_readme_presets_table_is_rafale_models():
    """The README's presets table as `python -m rafale.docprompt` writes it (rafale.model_sizes.markdown_table)."""
    readme = (ROOT / "README.md").read_text()
    current = readme_with_reference(readme)
    section = slice(readme.index(PRESETS_START), readme.index(PRESETS_END))
    assert current[section] == readme[section] and "| pythia | pythia-70m | 6 | 512 | 8/8 | 2048 | 50304 |" in readme
