"""Bad input files get one clear line naming the file and what was expected, and a non-zero exit, not a
traceback: a config file or a prompt file that is not UTF-8 (Latin-1). (A .txt scored under a run whose
data.text_column is another column: test_predict_score.py; a cut metrics.jsonl line: test_runs_table.py.)"""

import pytest

from rafale.main import main

LATIN1 = "training:\n  lr: 1.0e-3   # réglé à la main\n".encode("latin-1")


def run_main(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    return exit.value.code, capsys.readouterr().err


def test_a_latin1_config_is_one_line_naming_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(LATIN1)
    code, err = run_main(["-c", str(path)], capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert str(path) in line and "not UTF-8 (line 2" in line and "b'\\xe9gl" in line


def test_a_latin1_prompt_file_is_one_line_naming_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_bytes("Once upon a time\nIl était une fois\n".encode("latin-1"))
    code, err = run_main(["generate", str(tmp_path / "no-model-needed"), "--prompt-file", str(path)], capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("rafale: error: --prompt-file: ") and str(path) in line and "not UTF-8 (line 2" in line
