"""The README's Quickstart works as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    monitor = namespace["monitor"]
    assert monitor.n_evals == 11  # sanity evaluation + every 20 of 200 steps
    assert monitor.failures == 0 and monitor.alerts == []
    assert 0 <= monitor.last_result["kl/forward"] < 0.05  # the student has converged
    assert os.path.isdir(tmp_path / "lightning_logs")


def test_readme_opens_with_the_two_commands():
    lines = [ln for ln in README.read_text().splitlines() if ln.strip()]
    block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert block[0].startswith("make demo") and block[1].startswith("make test")
