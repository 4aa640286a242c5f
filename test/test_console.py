"""The console lines a person reads during a run (rafale.loggers), from the metrics Composer logs."""

from rafale.loggers import format_eval_line, format_train_line


def test_train_line_has_loss_speed_mfu_lr_and_time_in_minutes():
    logged = {"loss/train/total": 2.34567, "throughput/tokens_per_sec": 10030.4, "throughput/device/mfu": 0.371,
              "lr-AdamW/group0": 9.1e-4, "time/remaining_estimate": 0.05, "time/token": 4096}
    line = format_train_line(logged, elapsed_s=72)
    assert line == "loss 2.3457 | 10,030 tok/s | MFU 37.1% | lr 9.1e-04 | 1.2 min elapsed, 3.0 min left"


def test_train_line_leaves_out_what_was_not_logged():
    assert format_train_line({"loss/train/total": 1.0}, elapsed_s=6) == "loss 1.0000 | 0.1 min elapsed"


def test_eval_line_names_each_validation_metric():
    logged = {"metrics/eval/LanguageCrossEntropy": 1.01, "metrics/eval/LanguagePerplexity": 2.7456,
              "metrics/eval/BitsPerByte": 0.4123, "loss/train/total": 3.0}
    assert format_eval_line(logged) == "validation: loss 1.0100 | perplexity 2.75 | bits/byte 0.4123"
    assert format_eval_line({"metrics/eval/CrossEntropy": 0.3, "metrics/eval/Accuracy": 0.98}) == (
        "validation: loss 0.3000 | accuracy 0.9800")


def test_every_command_has_its_own_help_with_an_example(capsys):
    import pytest

    from rafale.main import COMMANDS, main

    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit:
            main([name, "--help"])
        out = capsys.readouterr().out
        assert exit.value.code == 0 and f"rafale {name}" in out and "example: rafale" in out, name
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(f"rafale {name} " in out for name in COMMANDS)  # the top-level help lists every command
