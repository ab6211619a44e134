"""The runnable example of docs/generators.md works as written (a real Trainer.fit)."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import global_state_restored

PAGE = Path(__file__).resolve().parents[1] / "docs" / "generators.md"


def test_generators_page_example_runs(tmp_path, monkeypatch):
    text = PAGE.read_text()
    section = text[text.index("## A runnable example"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with global_state_restored():
        exec(compile(code, "generators.md", "exec"), namespace)  # noqa: S102
    monitor = namespace["monitor"]
    assert monitor.n_evals == 7  # sanity evaluation + every 50 of 300 steps
    assert monitor.failures == 0 and monitor.alerts == []
    last = monitor.last_result
    assert last["kl/n"] == last["kl/m"] == 1024 and last["kl/d"] == 3
    # converged: both directions within 3 stderr + the k-NN bias of d = 3 of 0
    for key in ("forward", "reverse"):
        assert abs(last[f"kl/{key}"]) < 3 * last[f"kl/{key}_stderr"] + 0.1, last
