"""The inspector: a Streamlit app over an experiment's representation (`ddr inspect`).

`app.py` is the page; `data.py` reads `representation/` (no Streamlit there, so notebooks and
tests can use it). `inspector_command` is the command line `ddr inspect` runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

APP = Path(__file__).with_name("app.py")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8501


def inspector_command(experiment_dir: Path | str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> list[str]:
    """`streamlit run ddr/inspector/app.py ... -- --experiment-dir DIR`, bound to `host` (loopback by default)."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",
        "--",
        "--experiment-dir",
        str(Path(experiment_dir).resolve()),
    ]
