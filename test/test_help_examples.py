"""Every example in every command's --help runs as written (`rafale runs --help` once suggested `--sort lr`, which
fails where lr was not varied).

The examples are read from the help itself (`example: rafale ...` lines, or the lines under `examples:`), each run
in a folder of its own that holds what the examples name: `runs/pythia-tiny-stories`, `runs/bert-cls-stories` and
`runs/clip-shapes` (tiny runs trained once for this module), `runs/a` and `runs/b`, `cfg.yaml`, `held-out.txt`,
`verses.txt`, `rows.csv`, `photos/`, `tasks/` (an lm-eval task named mytask) and `test/` (this repository's
configs). An example that trains (`rafale -c ...`, `rafale sweep ...`) is run with SHORTER appended: the same
command on a few stories for 2 batches, in a folder with no runs yet.

Every command in the shell blocks of README.md and docs/*.md is checked as written, up to where it would start its
work: the repository's files it names exist; rafale parses its arguments, and a training run or a sweep loads its
config with the command's overrides and checks its optimizer and model section (a misspelt command, option, key,
value, preset or config fails)."""

import contextlib
import csv
import io
import json
import os
import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT, write_config, write_lm_eval_task
from rafale.main import COMMANDS, main

# what a training example gets appended: the tiniest Pythia on a few stories, for 2 batches
SHORTER = ["data.num_train_stories=200", "data.num_val_stories=20", "data.vocab_size=300", "data.block_size=64",
           "model.preset=pythia-debug", "training.max_duration=2ba", "training.eval_interval=2ba",
           "training.save_interval=2ba", "training.warmup=0ba", "training.precision=fp32"]
TRAINING = 4  # batches each fixture run trains


def rafale(argv: list[str], env: dict | None = None) -> tuple[int, str, str]:
    """rafale.main.main(argv) in this process, with `env` set: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(argv)
            except SystemExit as exit:
                code = exit.code
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    return code, out.getvalue(), err.getvalue()


def help_text(command: list[str]) -> str:
    # argparse wraps its help at the terminal's width: as wide as needed, one example a line
    code, out, err = rafale(command + ["--help"], env={"COLUMNS": "1000"})
    assert code == 0, err
    return out


def examples(text: str) -> list[str]:
    """The commands of `example: rafale ...` lines and of the lines under `examples:`, without their comments (what
    follows two spaces)."""
    found, listing = [], False
    for line in text.splitlines():
        if line.startswith("example: "):
            found.append(re.split(r"\s{2,}", line[len("example: "):].strip())[0])
        elif line.strip() == "examples:":
            listing = True
        elif listing and line.startswith("  ") and line.strip():
            found.append(re.split(r"\s{2,}", line.strip())[0])
        else:
            listing = False
    return found


HELPS = [[]] + [[name] for name in COMMANDS]  # `rafale --help`, then each command's


def test_every_command_has_examples_in_its_help():
    for command in HELPS:
        found = examples(help_text(command))
        assert found and all(re.match(r"([A-Z_]+=\S+ )*rafale ", example) for example in found), (command, found)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, cache_dir):
    """The run folders and files the examples name, made once."""
    folder = tmp_path_factory.mktemp("help_examples")
    runs = folder / "runs"
    steps = {"max_duration": f"{TRAINING}ba", "eval_interval": f"{TRAINING}ba", "save_interval": f"{TRAINING}ba",
             "warmup": "0ba", "precision": "fp32"}
    configs = [
        # two checkpoints (batches 2 and 4): `rafale average ... --last 2` averages them
        write_config(folder / "lm.yaml", run={"name": "pythia-tiny-stories", "output_dir": str(runs)},
                     training={**steps, "save_interval": f"{TRAINING // 2}ba"}),
        write_config(folder / "cls.yaml", base="bert_cls_stories.yaml",
                     run={"name": "bert-cls-stories", "output_dir": str(runs)},
                     data={"num_train_stories": 200, "num_val_stories": 40, "vocab_size": 500, "block_size": 64},
                     training={**steps, "batch_size": 16}),
        write_config(folder / "clip.yaml", base="clip_shapes.yaml", run={"name": "clip-shapes", "output_dir": str(runs)},
                     data={"vocab_size": 512, "block_size": 32, "image_size": 32, "num_train_images": 48,
                           "num_val_images": 16, "num_zero_shot_images": 36},
                     model={"preset": "clip-debug", "vision": {"patch_size": 8}}, training={**steps, "batch_size": 16}),
    ]
    for cfg in configs:
        code, out, err = rafale(["-c", str(cfg)])
        assert code == 0, (out + err)[-3000:]
    files = folder / "files"
    files.mkdir()
    from rafale.data.shapes import zero_shot_set
    from rafale.data.stories import labelled_story_splits, story_splits

    stories = story_splits(20, 10, seed=1)["validation"]
    (files / "held-out.txt").write_text("<|endoftext|>".join(stories))
    (files / "verses.txt").write_text("\n".join(story.replace("\n", " ") for story in stories))
    with (files / "rows.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *labelled_story_splits(20, 10, seed=1)["validation"]])
    (files / "photos").mkdir()
    for i, (image, _) in enumerate(zero_shot_set(36, seed=5, image_size=32)):
        if i < 4:
            image.save(files / "photos" / f"{i}.png")
    (files / "tasks").mkdir()
    write_lm_eval_task(files / "tasks", "mytask", [
        {"question": f"Story {i}: the dog was", "choices": [" happy", " sad"], "answer": i % 2} for i in range(4)])
    write_config(files / "cfg.yaml", training=steps)  # the debug config, output_dir runs
    law_runs(runs / "law")
    return {"runs": runs, "files": files}


def law_runs(folder: Path) -> None:
    """runs/law, which `rafale law`'s example fits: 4 widths x 3 budgets of complete runs named as the sweep of
    test/law_stories.yaml names them, each with the loss of a known law (test_law's)."""
    from test_law import BUDGETS, SIZES, fake_run, law_loss

    for width, N in zip((48, 64, 96, 128), SIZES):
        for D in BUDGETS[:3]:
            fake_run(folder, f"law-hs{width}-is{4 * width}-{int(D)}", int(N), int(D), law_loss(N, D))


def workdir(fixtures, where: Path, with_runs: bool) -> Path:
    """A folder where the examples' names resolve: the files, this repository's test/, and (unless the example
    trains) runs/ holding the fixture runs, with runs/a and runs/b two of them."""
    where.mkdir()
    for item in fixtures["files"].iterdir():
        (where / item.name).symlink_to(item)
    (where / "test").symlink_to(ROOT / "test")
    if with_runs:
        (where / "runs").mkdir()
        for run in fixtures["runs"].iterdir():
            (where / "runs" / run.name).symlink_to(run)
        (where / "runs" / "a").symlink_to(fixtures["runs"] / "pythia-tiny-stories")
        (where / "runs" / "b").symlink_to(fixtures["runs"] / "pythia-tiny-stories")
    return where


EXAMPLES = [(command, example) for command in HELPS for example in examples(help_text(command))]


@pytest.mark.parametrize("example", [example for _, example in EXAMPLES])
def test_each_help_example_runs_as_written(example, fixtures, tmp_path, monkeypatch):
    words = shlex.split(example)
    env = dict(word.split("=", 1) for word in words[: words.index("rafale")])
    argv = words[words.index("rafale") + 1:]
    trains = not argv or argv[0] not in COMMANDS or argv[0] == "sweep"
    monkeypatch.chdir(workdir(fixtures, tmp_path / "here", with_runs=not trains))
    code, out, err = rafale(argv + (SHORTER if trains else []), env=env)
    assert code == 0, (example, (out + err)[-3000:])


# ---- Every command in the README's and docs/'s shell blocks, as written: parsed, its config loaded and checked ----

DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.S | re.M)
SEPARATORS = {"&&", "||", ";", "|", "&"}
# how a page spells rafale: the command, the module, the script (also under Composer's launcher: `composer -n 8
# rafale/main.py ...`, whose arguments start after the script)
RAFALE = (("rafale",), (".venv/bin/rafale",), ("python", "-m", "rafale"), ("python3", "-m", "rafale"),
          (".venv/bin/python", "-m", "rafale"), ("python", "rafale/main.py"), ("python", "rafale/main"))
# a word naming a file of this repository (a config, a script, a bench): it must exist
REPO_PATH = re.compile(r"(?:^|=)((?:test|bench|rafale|docs|media|\.ci)/[\w./-]*)$")


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of the text's shell code blocks, as the shell splits them into words: lines joined at a
    trailing backslash, comments dropped, `a && b; c | d` cut into a, b, c and d."""
    commands = []
    for block in SHELL_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split, lexer.commenters = True, "#"
            command = []
            for word in [*lexer, ";"]:
                if word in SEPARATORS:
                    commands += [command] if command else []
                    command = []
                else:
                    command.append(word)
    return commands


def rafale_argv(words: list[str]) -> tuple[dict, list[str]] | None:
    """(environment, rafale's arguments) of a command that runs rafale (`DATA=1 rafale -c ...`), else None."""
    env = {}
    while words and re.match(r"[A-Z_]+=", words[0]):
        name, value = words[0].split("=", 1)
        env[name], words = value, words[1:]
    if words and words[0].endswith("composer") and "rafale/main.py" in words:  # Composer's launcher
        words = words[words.index("rafale/main.py") - 1:]
        words[0] = "python"
    for spelling in RAFALE:
        if tuple(words[: len(spelling)]) == spelling:
            return env, words[len(spelling):]
    return None


DOC_COMMANDS = [(page.relative_to(ROOT).as_posix(), words) for page in DOC_PAGES
                for words in shell_commands(page.read_text())]


class Checked(Exception):
    """Raised where a command would start its work: its arguments parsed, and its config loaded and checked."""


def run_until_its_work(argv: list[str], env: dict, monkeypatch) -> tuple[int, str]:
    """rafale.main.main(argv) up to where the command would start its work: a command's arguments parsed; a training
    run's config loaded with its overrides, its optimizer and model section checked (the model's sizes, but those of
    a hub checkpoint, which need the internet); each point of a sweep the same. (0, "") there, else (exit code,
    output)."""
    import argparse

    import rafale.main
    import rafale.resolve
    import rafale.commands.sweep  # noqa: F401 (binds the real resolve_model_config: a sweep checks each of its points)

    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        parsed = parse(parser, args, namespace)
        if parser.prog not in ("rafale", "rafale sweep"):  # the commands that train go on to load their config
            raise Checked(parser.prog)
        return parsed

    resolve = rafale.resolve.resolve_model_config

    def resolve_then_stop(cfg):
        if not str(cfg.model.pretrained or "").startswith("hf:"):
            resolve(cfg)
        raise Checked("rafale -c")

    def stop(decide):
        raise Checked("rafale sweep")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(rafale.resolve, "resolve_model_config", resolve_then_stop)
    monkeypatch.setattr(rafale.main, "on_every_rank", stop)  # a sweep has checked every point when it plans them
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main(argv)
        except Checked:
            return 0, ""
        except SystemExit as exit:
            return exit.code, out.getvalue()
    return 1, out.getvalue()  # main always exits


def check_as_written(words: list[str], monkeypatch, where: Path) -> None:
    """A command of the docs, as written: the repository's files it names exist, and if it runs rafale, rafale takes
    it (in `where`, which holds this repository's test/ and bench/, and cfg.yaml, the placeholder the docs use)."""
    for word in words:
        for path in REPO_PATH.findall(word):
            assert (ROOT / path).exists(), f"{' '.join(words)}: no such file {path}"
    found = rafale_argv(words)
    if found:
        monkeypatch.chdir(where)
        code, out = run_until_its_work(found[1], found[0], monkeypatch)
        assert code == 0, f"{' '.join(words)}: {out[-3000:]}"


@pytest.fixture(scope="module")
def repository_copy(tmp_path_factory):
    """A folder where the docs' commands run: this repository's test/ and bench/, cfg.yaml (the debug config), and
    beside it a stand-in for ../shared's TinyStories sample, which the measurement configs read (a user's own file:
    the project never needs ../shared, so a test may not either)."""
    where = tmp_path_factory.mktemp("docs_commands") / "repository"
    where.mkdir()
    sample = where.parent / "shared" / "data" / "tinystories" / "train-head-2MiB.txt"
    sample.parent.mkdir(parents=True)
    sample.write_text("Once upon a time.<|endoftext|>The end.\n")
    for name in ("test", "bench"):
        (where / name).symlink_to(ROOT / name)
    write_config(where / "cfg.yaml")
    return where


@pytest.mark.parametrize("page, words", DOC_COMMANDS, ids=[f"{page}:{' '.join(words)[:60]}" for page, words in DOC_COMMANDS])
def test_each_command_of_the_readme_and_docs_runs_as_written(page, words, repository_copy, monkeypatch):
    check_as_written(words, monkeypatch, repository_copy)


def test_the_readme_shows_each_command():
    commands = [rafale_argv(words) for page, words in DOC_COMMANDS if page == "README.md"]
    shown = {argv[0] for _, argv in filter(None, commands) if argv and argv[0] in COMMANDS}
    assert shown == set(COMMANDS), set(COMMANDS) - shown
    assert any(argv[:1] == ["-c"] for _, argv in filter(None, commands))  # and training


@pytest.mark.parametrize("line", [
    "rafale genrate runs/pythia-tiny-stories --prompt hi",  # no such command
    "rafale generate runs/pythia-tiny-stories --prompt hi --temprature 0.8",  # no such option
    "rafale score runs/pythia-tiny-stories",  # a required option left out
    "rafale -c test/no_such_config.yaml",  # no such config in the repository
    "rafale -c no_such_config.yaml",  # nor where the command runs
    "DATA=1 rafale -c test/pythia_tinystories.yaml training.lrr=1e-3",  # no such key
    "rafale -c test/pythia_tinystories.yaml model.preset=pythia-tiniest",  # no such preset: the model section
    "rafale -c test/pythia_tinystories.yaml training.optimizer.name=adamm",  # no such optimizer
    "rafale sweep -c test/pythia_tinystories.yaml training.lr=1e-3,3e-3 model.preset=pythia-tiny,pythia-tiniest",
    "composer -n 2 rafale/main.py -c cfg.yaml training.max_duration=two",  # a bad value, under the launcher
    ".venv/bin/python bench/no_such_bench.py --quick",  # a script that is not there
])
def test_a_misspelt_command_fails_the_check(line, repository_copy, monkeypatch):
    (words,) = shell_commands(f"```bash\n{line}\n```\n")
    with pytest.raises(AssertionError):
        check_as_written(words, monkeypatch, repository_copy)
