import subprocess
import sys

import pytest

from nanoseek.cli import main
from nanoseek.config import PRESETS


@pytest.mark.parametrize("preset", list(PRESETS))
def test_info_prints_counts_for_every_preset(preset, capsys):
    assert main(["info", "--preset", preset]) == 0
    out = capsys.readouterr().out
    for field in ("total params", "activated/token", "MTP params"):
        assert field in out


def test_info_v3_is_671b_with_37b_activated(capsys):
    main(["info", "--preset", "v3-671b"])
    out = capsys.readouterr().out
    assert "total params     671.0B (671,026,404,352)" in out
    assert "activated/token  37.6B" in out
    assert "latent cache 576 values/token/layer" in out


def test_info_bench_1b_matches_the_anchor(capsys):
    main(["info", "--preset", "bench-1b"])
    out = capsys.readouterr().out
    assert "total params     1.2B (1,235,321,344)" in out  # anchor: 1235.3M total
    assert "activated/token  231.8M" in out  # anchor: 231.8M activated


def test_info_reads_a_config_json(tmp_path, capsys):
    from nanoseek.config import get_preset
    get_preset("tiny").save(tmp_path / "config.json")
    assert main(["info", "--config", str(tmp_path)]) == 0
    assert "0.2M (249,984)" in capsys.readouterr().out


def test_info_error_is_a_message_not_a_traceback(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v3", "n_group": 3}')
    assert main(["info", "--config", str(tmp_path)]) == 2
    assert "nanoseek: error: invalid config field 'n_group' = 3" in capsys.readouterr().err


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "nanoseek.cli", "info", "--preset", "tiny"],
                            capture_output=True, text=True, check=True)
    assert "activated/token" in result.stdout
