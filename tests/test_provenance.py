"""What every benchmark result records: device, commit, and the JSON file itself."""

import json
import re
from pathlib import Path

from nanoseek.provenance import device_name, git_commit, write_result


def test_commit_device_and_result_file(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parent)  # inside this checkout
    assert re.fullmatch(r"[0-9a-f]{40}", git_commit())
    monkeypatch.chdir(tmp_path)  # outside any checkout (git may not look above tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_commit() == "unknown"
    assert device_name("cpu")
    path = write_result(tmp_path / "results" / "x.json", {"device": "cpu", "path": tmp_path})
    assert json.loads(path.read_text()) == {"device": "cpu", "path": str(tmp_path)}
