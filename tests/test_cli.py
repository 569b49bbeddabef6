import subprocess
import sys

import pytest

from shoprec.cli import build_parser

COMMANDS = ["data", "features", "train", "export", "evaluate", "serve", "recommend", "bench", "all"]


def test_help_lists_every_stage():
    text = build_parser().format_help()
    for c in COMMANDS:
        assert c in text


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help(command):
    out = subprocess.run([sys.executable, "-m", "shoprec.cli", command, "--help"], capture_output=True, text=True, check=True)
    assert "usage: shoprec" in out.stdout and command in out.stdout


def test_config_rejects_unknown_keys(tmp_path):
    from shoprec.config import load_config

    p = tmp_path / "c.toml"
    p.write_text("[serve]\nnum_candidate = 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_candidate'\]"):
        load_config(p)
