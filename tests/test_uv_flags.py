"""tools/uv_flags.py: `make venv` installs with uv, which must find packages where pip's configuration says."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
from uv_flags import pip_settings, uv_flags  # noqa: E402

LISTED = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.find-links='/opt/wheels'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/srv/other-wheels'
global.index-url='https://mirror.example/simple'
"""


def test_pip_settings_become_uv_flags_with_pip_variables_first():
    settings = pip_settings(LISTED)
    assert settings["find-links"] == ["/opt/wheels"]  # PIP_FIND_LINKS over pip.conf, as pip does
    assert uv_flags(settings) == [
        "--index-strategy",
        "unsafe-best-match",  # pip takes the best version over all indexes
        "--index-url",
        "https://mirror.example/simple",
        "--extra-index-url",
        "file:///opt/pypi/simple",
        "--extra-index-url",
        "file:///opt/pypi-more/simple",
        "--find-links",
        "/opt/wheels",
        "--constraint",
        "/etc/xdg/pip/constraints.txt",
    ]


def test_no_pip_configuration_leaves_uv_on_its_defaults():
    assert uv_flags(pip_settings("")) == []
    assert uv_flags(pip_settings(":env:.cert='/x.pem'\nglobal.timeout='60'\n")) == []


def test_the_script_prints_flags_a_shell_can_split():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "uv_flags.py")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    # every flag takes a value
    assert all(words[i].startswith("--") for i in range(0, len(words), 2)) and len(words) % 2 == 0, words
