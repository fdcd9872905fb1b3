""".env.example documents every setting, and documents nothing that is not one."""
from __future__ import annotations

import re
from pathlib import Path

from worker.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent


def test_env_example_names_every_setting_and_only_settings():
    text = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*(AMI_[A-Z0-9_]+)=", text, flags=re.MULTILINE))
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert fields - documented == set(), "undocumented settings"
    assert documented - fields == set(), "documented names that are not settings"
