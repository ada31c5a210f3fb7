"""What the README says of the code, checked against the code."""

import re

from conftest import ROOT


def test_the_architecture_section_lists_the_module_banners_in_order():
    source = (ROOT / "k2proxy.py").read_text(encoding="utf-8")
    banners = re.findall(r"^# ─── (.+?) ─+$", source, re.MULTILINE)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## How it is built", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\d+\. \*\*(.+?)\*\*", section, re.MULTILINE)
    assert listed == banners and len(banners) > 10
