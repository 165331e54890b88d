"""Progress bars: on a terminal the CLI shows one and it ends complete; off a terminal and with
--quiet / --json nothing is drawn; without rich a plain line; nested bars share one display."""

from __future__ import annotations

import errno
import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from graphsurg import _console
from graphsurg._console import Console, progress, progress_enabled

HERE = Path(__file__).parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Tty(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _cli_in_pty(*args: str, cwd: Path, timeout: float = 180) -> tuple[int, str]:
    """Run ``python -m graphsurg ARGS`` with stdin, stdout and stderr on a pseudo-terminal
    (120x40); returns the exit code and everything written to the terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in os.environ.items()
           if k not in ("NO_COLOR", "COLUMNS", "LINES", "CI", "TERM")}
    env.update(TERM="xterm-256color", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "graphsurg", *args], cwd=cwd, env=env,
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError as e:  # EIO: the child closed the terminal
                if e.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            chunks.append(data)
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"graphsurg {' '.join(args)} ran over {timeout} s")
        rc = proc.wait(timeout=30)
    finally:
        os.close(master)
    return rc, b"".join(chunks).decode("utf-8", "replace")


DEMO = ("demo", "--models", "dead_mlp", "--steps", "5", "--no-report")


def test_cli_bar_on_a_terminal_appears_and_ends(tmp_path: Path) -> None:
    rc, out = _cli_in_pty(*DEMO, cwd=tmp_path)
    assert rc == 0, out[-2000:]
    text = ANSI.sub("", out)
    counts = [(int(a), int(b)) for a, b in re.findall(r"training dead_mlp.*?(\d+)/(\d+)", text)]
    assert counts, text[-2000:]  # the bar appeared ...
    assert "━" in text  # ... drawn by rich
    total = counts[-1][1]
    assert total > 10 and counts[-1] == (total, total)  # ... and ended complete
    assert any(a < total for a, _ in counts[:-1]) or len(counts) == 1
    assert out.rfind("\x1b[?25h") > out.rfind("\x1b[?25l")  # the cursor is given back
    assert text.rstrip().endswith("s") and "demo finished" in text


@pytest.mark.parametrize("flag", ["--quiet", "--json"])
def test_cli_is_silent_with_quiet_and_json(flag: str, tmp_path: Path) -> None:
    rc, out = _cli_in_pty(*DEMO, flag, cwd=tmp_path)
    assert rc == 0, out[-2000:]
    assert "training dead_mlp" not in ANSI.sub("", out) and "\x1b[?25l" not in out


def test_off_a_terminal_nothing_unless_asked() -> None:
    s = io.StringIO()
    with progress(10, "measuring", stream=s) as bar:
        for _ in range(10):
            bar.advance()
    assert s.getvalue() == "" and bar.completed == 10
    with progress(20, "measuring", stream=s, enabled=True) as bar:
        for _ in range(20):
            bar.advance()
    lines = s.getvalue().splitlines()
    # one line at the start, one per 10 % (2 steps), one at the end
    assert lines[0] == "graphsurg: measuring 0/20" and len(lines) == 12
    assert re.fullmatch(r"graphsurg: measuring 20/20 done in \d+\.\d s", lines[-1])


def test_progress_enabled_false_wins() -> None:
    s = _Tty()
    with progress_enabled(False), progress(5, "healing", stream=s, enabled=True) as bar:
        bar.advance(5)
    assert s.getvalue() == ""
    with progress_enabled(None), progress(5, "healing", stream=s) as bar:
        bar.advance(5)
    assert "healing" in s.getvalue()  # a terminal: shown by default


def test_plain_line_on_a_terminal_without_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_console, "_has_rich", lambda: False)
    s = _Tty()
    with progress(None, "rounds", stream=s) as bar:  # unknown total: a count
        bar.advance()
        bar.relabel("round 2")
        bar.advance()
    last = s.getvalue().split("\r\x1b[2K")[-1]
    assert re.fullmatch(r"graphsurg: round 2 2 done in \d+\.\d s\n", last), repr(last)


def test_nested_bars_share_one_rich_display() -> None:
    pytest.importorskip("rich")
    s = _Tty()
    with progress(3, "operate", stream=s) as outer:
        for i in range(3):
            with progress(4, f"diagnose {i}", stream=s) as inner:
                inner.advance(4)
            outer.advance()
    assert _console._LIVE == []  # the display is closed
    text = ANSI.sub("", s.getvalue())
    assert "operate" in text and "3/3" in text and "diagnose 0" in text


def test_console_progress_follows_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    err = _Tty()
    monkeypatch.setattr(sys, "stderr", err)
    with Console(quiet=True, stream=io.StringIO()).progress("training", 4) as bar:
        bar.advance(4)
    assert err.getvalue() == ""
    with Console(quiet=False, stream=io.StringIO()).progress("training", 4) as bar:
        bar.advance(4)
    assert "training" in ANSI.sub("", err.getvalue())


def test_healing_and_measuring_report_progress(capsys: pytest.CaptureFixture[str]) -> None:
    """operate's long steps (measuring batches in each diagnosis, the healing fine-tune) go
    through the one progress helper; silent unless asked (off a terminal)."""
    import torch

    import graphsurg as gs
    from graphsurg._heal import heal

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    batches = [(torch.randn(16, 4), torch.randn(16, 1)) for _ in range(2)]

    def mse(out: torch.Tensor, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.mse_loss(out, b[1])

    heal(model, batches, mse, steps=5)
    gs.diagnose(model, batches)
    assert capsys.readouterr().err == ""
    with progress_enabled(True):
        heal(model, batches, mse, steps=5)
        gs.diagnose(model, batches)
    err = capsys.readouterr().err
    assert "healing (fine-tune steps) 5/5" in err and "measuring batches 2/2" in err, err
