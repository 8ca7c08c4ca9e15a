"""`kandinsky3 serve`'s flags: refused before anything loads, with one line and status 2."""

import pytest

from kandinsky3.cli import main


@pytest.mark.parametrize("flags, reason", [
    (["--queue-size", "0"], "--queue-size must be >= 1"),
    (["--max-side", "0"], "--max-side must be >= 1"),
    (["--device", "tpu"], "device 'tpu'"),
    (["--lora-dir", "/no/such/folder"], "--lora-dir /no/such/folder: no such folder"),
])
def test_bad_serve_flags_end_in_one_line_and_status_2(capsys, flags, reason):
    assert main(["serve", "--model", "tiny", "--no-ui", *flags]) == 2
    error = capsys.readouterr().err
    assert reason in error and error.count("\n") == 1 and "Traceback" not in error


def test_serve_help_lists_the_server_flags(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in ("--api-key", "--queue-size", "--timeout", "--max-side", "--max-body-mb", "--device", "--lora-dir"):
        assert flag in text
