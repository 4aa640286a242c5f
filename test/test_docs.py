import re

from rafale.docprompt import ROOT, main


def test_readme_reference_and_llm_docprompt_are_current():
    # fails when a config field, its help, the README or any source file changed without regenerating
    assert main(["--check"]) == 0, "run: python -m rafale.docprompt"


def test_readme_lists_configs_that_exist():
    readme = (ROOT / "README.md").read_text()
    for path in set(re.findall(r"test/[\w.-]+\.yaml", readme)):
        assert (ROOT / path).is_file(), path
