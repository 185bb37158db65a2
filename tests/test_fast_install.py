"""cluster/fast_install.py: `make setup` installs with uv from the sources pip is configured with."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cluster"))

import fast_install  # noqa: E402


def test_pip_settings_read_the_config_file_and_the_variables_win(tmp_path, monkeypatch):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nextra-index-url = file:///a file:///b\nconstraint = /tmp/c.txt\n"
                    "find-links = /from-file\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("PIP_FIND_LINKS", "/from-env")
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    got = fast_install.pip_settings(sys.executable)
    # the file named by PIP_CONFIG_FILE wins over the machine's files, and PIP_FIND_LINKS over every file
    assert got["extra-index-url"] == "file:///a file:///b"
    assert got["constraint"] == "/tmp/c.txt"
    assert got["find-links"] == "/from-env"


def test_uv_arguments_carry_every_source_and_match_pip_across_indexes():
    args = fast_install.uv_arguments({"index-url": "https://mirror/simple", "extra-index-url": "file:///a file:///b",
                                      "find-links": "/w", "constraint": "/c.txt", "no-index": "false",
                                      "default-timeout": "180"})
    assert args == ["--index-strategy", "unsafe-best-match", "--index-url", "https://mirror/simple",
                    "--extra-index-url", "file:///a", "--extra-index-url", "file:///b", "--find-links", "/w",
                    "--constraint", "/c.txt"]
    assert fast_install.uv_arguments({"no-index": "1"})[-1] == "--no-index"
    assert fast_install.uv_arguments({}) == ["--index-strategy", "unsafe-best-match"]


def test_without_uv_it_exits_non_zero_so_that_make_falls_back_to_pip(tmp_path):
    """A venv without uv: the script says so and exits 3; the Makefile's `||` then installs with pip."""
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PATH"}
    env["PATH"] = str(tmp_path)  # no uv on PATH either
    out = subprocess.run([str(venv / "bin" / "python"), str(ROOT / "cluster" / "fast_install.py"), "-e", "."],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 3 and "installing with pip instead" in out.stderr, out.stderr


def test_setup_compiles_the_bytecode_of_every_supported_hf_architecture_and_no_test_folder():
    """The Makefile's compileall skip (PYC_SKIP) keeps the model code of every Hugging Face architecture coopt loads
    (families.HF_TYPES), the auto classes and the package roots, and skips test folders and other architectures."""
    import re

    from coopt_ray.families import HF_TYPES

    line = next(ln for ln in (ROOT / "Makefile").read_text().splitlines() if ln.startswith("PYC_SKIP :="))
    skip = re.compile(line.split(":=", 1)[1].strip())
    site = "/v/lib/python3.11/site-packages/"
    for t in {t.replace("_vision_model", "") for t in HF_TYPES} | {"auto", "bit", "encoder_decoder"}:
        assert not skip.search(f"{site}transformers/models/{t}/modeling_{t}.py"), t
    for kept in ("transformers/models/__init__.py", "torch/testing/_comparison.py", "ray/data/dataset.py"):
        assert not skip.search(site + kept), kept
    for skipped in ("transformers/models/llama/modeling_llama.py", "pandas/tests/io/test_csv.py", "ray/tests/x.py"):
        assert skip.search(site + skipped), skipped
