"""The README: its copy-paste example runs as written, and its figures are the latest."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .conftest import BIN, free_port

README = Path(__file__).parent.parent / "README.md"


def _block(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def test_track_functions_without_changing_code_example(tmp_path: Path, isolated_env: str) -> None:
    port = str(free_port())
    script = _block("## Track functions without changing code")
    script = script.replace("/tmp/shopdemo", str(tmp_path / "shopdemo")).replace("8877", port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_ZENML_ANALYTICS_CONFIG_DIR"] = isolated_env  # never the developer's own consent
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    out = subprocess.run(["bash", "-c", f"set -e\n{script}\nkill %1"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 x book" in out.stdout
    rows = [line for line in out.stdout.splitlines() if "Order placed" in line]
    assert len(rows) == 1 and " true " in rows[0], out.stdout


def test_the_readme_quotes_the_latest_figures() -> None:
    """``make bench``/``make reliability`` write both places; they must agree."""
    from bench import readme

    root = Path(__file__).resolve().parent.parent
    for name, results in (("bench", "bench/results.md"),
                          ("reliability", "bench/reliability.md")):
        text = (root / results).read_text(encoding="utf-8")
        assert readme.quoted(name) == readme.block(name, text), \
            f"README figures differ from {results}: rerun `make {name}` or splice them"
