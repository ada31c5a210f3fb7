"""What the README says of the code, checked against the code."""

import re

from conftest import ROOT
import k2proxy


def test_the_architecture_section_lists_the_module_banners_in_order():
    source = (ROOT / "k2proxy.py").read_text(encoding="utf-8")
    banners = re.findall(r"^# ─── (.+?) ─+$", source, re.MULTILINE)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## How it is built", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\d+\. \*\*(.+?)\*\*", section, re.MULTILINE)
    assert listed == banners and len(banners) > 10


def test_the_monitoring_section_names_every_metric_the_proxy_exports():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Metrics for Prometheus", 1)[1].split("\n### ", 1)[0]
    named = re.findall(r"`(k2proxy_[a-z_]+)[{`]", section)
    assert sorted(named) == sorted(k2proxy.METRIC_HELP)
