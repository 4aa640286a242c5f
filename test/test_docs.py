import re

from rafale.commands.docprompt import (LEFT_OUT_PAGES, MAX_BYTES, REFERENCE_PAGE, ROOT, current_pages, doc_pages, docprompt,
                              main, outline)


def test_config_reference_and_llm_docprompt_are_current():
    # fails when a config field, its help, the README, a docs/ page or a public signature changed without regenerating
    assert main(["--check"]) == 0, "run: python -m rafale.commands.docprompt"


def test_llm_docprompt_fits_in_one_message():
    size = len((ROOT / "llm-docprompt.txt").read_bytes())
    assert 60_000 < size <= MAX_BYTES, size


def test_editing_a_function_body_outside_the_full_files_changes_nothing():
    """A fix inside a function of train.py (not shown in full) leaves llm-docprompt.txt as it is; a new public
    function does not."""
    source = (ROOT / "rafale" / "run" / "train.py").read_text()
    name = "def datapipe_for("
    body_start = source.index('"""', source.index('"""', source.index(name)) + 3) + 3  # after its docstring
    edited = source[:body_start] + "\n    _unused = 1 + 1  # an edit of the body" + source[body_start:]
    assert outline(edited) == outline(source)
    edited = source[:body_start] + "\n    x = 1\n    return x" + source[body_start:]
    assert outline(edited) == outline(source)
    assert outline(source + "\n\ndef brand_new(x: int) -> int:\n    return x\n") != outline(source)


def test_the_docprompt_holds_the_readme_the_docs_the_decoder_and_every_module():
    pages = current_pages()
    text = docprompt(pages)
    assert "## Hacking on rafale" in text and "class ALiBi(Positions)" in text  # the README and the recipes
    assert "| `batch_size` |" in text  # docs/config.md's generated reference
    for name in doc_pages():
        assert f"#### {name}\n" in text, name
        if name not in LEFT_OUT_PAGES:
            assert pages[name].split("\n## ", 1)[-1] in text, name  # the page as written, to its end
    assert "out of date" not in text and "Every figure this project measured" not in text  # measurements left out
    assert (ROOT / "rafale" / "models" / "decoder.py").read_text() in text
    for path in sorted((ROOT / "rafale").rglob("*.py")):
        assert f"#### {path.relative_to(ROOT)}\n" in text or f"#### {path.relative_to(ROOT)} (in full)\n" in text, path


def test_the_readme_links_every_docs_page_and_each_says_what_it_is_for():
    """Each docs/ page is listed in the README's "Documentation" and opens with a title and a paragraph saying what a
    reader can do with it; every relative link in the README and docs/ points at a file that exists."""
    readme = (ROOT / "README.md").read_text()
    listing = readme.split("\n## Documentation\n", 1)[1].split("\n## ", 1)[0]
    pages = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "docs").glob("*.md"))
    assert pages and sorted(re.findall(r"\]\((docs/[\w.-]+\.md)\)", listing)) == pages
    for name in pages:
        title, first, *_ = (ROOT / name).read_text().split("\n\n")
        assert title.startswith("# ") and "\n" not in title and len(first) > 80 and not first.startswith(("#", "|", "`")), name
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target, anchor in re.findall(r"\]\(([^):#\s]*)(?:#([^)]*))?\)", path.read_text()):
            linked = (path.parent / target) if target else path
            assert linked.exists(), (path.name, target)
            if anchor:
                assert anchor in headings(linked), (path.name, target, anchor)


def headings(page) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, spaces to '-', punctuation but '-' and '_' dropped."""
    titles = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-") for title in titles}


def test_readme_and_docs_list_configs_that_exist():
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for config in set(re.findall(r"test/[\w.-]+\.yaml", path.read_text())):
            assert (ROOT / config).is_file(), (path.name, config)


def test_the_config_reference_is_on_its_page():
    page = (ROOT / REFERENCE_PAGE).read_text()
    assert "<!-- config-reference:start -->" in page and "| `max_duration` |" in page
