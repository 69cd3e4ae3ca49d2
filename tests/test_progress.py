"""The CLI's messages (hawqtool/progress.py): a long path stays on one line whatever the console width."""
from __future__ import annotations

from rich.console import Console

from hawqtool.progress import Reporter


def test_a_long_path_is_said_on_one_line(capsys):
    rep = Reporter()
    rep.console = Console(stderr=True, width=60)
    path = "/tmp/" + "/".join(f"folder{i:02d}" for i in range(20)) + "/sensitivity.html"
    rep.say(f"wrote {path}")
    assert capsys.readouterr().err.splitlines() == [f"wrote {path}"]


def test_quiet_says_nothing(capsys):
    rep = Reporter(quiet=True)
    rep.say("wrote somewhere")
    assert capsys.readouterr().err == ""
