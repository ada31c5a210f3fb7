"""What the README and the docs pages it links say of the code, checked against the code."""

import re

from conftest import ROOT

import k2proxy


def docs_page(name):
    return (ROOT / "docs" / name).read_text(encoding="utf-8")


def test_the_architecture_page_lists_the_module_banners_in_order():
    source = (ROOT / "k2proxy.py").read_text(encoding="utf-8")
    banners = re.findall(r"^# ─── (.+?) ─+$", source, re.MULTILINE)
    listed = re.findall(r"^\d+\. \*\*(.+?)\*\*", docs_page("architecture.md"), re.MULTILINE)
    assert listed == banners and len(banners) > 10


def test_the_monitoring_page_names_every_metric_the_proxy_exports():
    section = docs_page("monitoring.md").split("## Metrics for Prometheus", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`(k2proxy_[a-z_]+)[{`]", section)
    assert sorted(named) == sorted(k2proxy.METRIC_HELP)


def anchors(markdown):
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL),
                          re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_the_readme_links_every_docs_page_and_every_link_leads_somewhere():
    readme = ROOT / "README.md"
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)(?:#[\w-]+)?\)", readme.read_text(encoding="utf-8")))
    assert linked == {page.name for page in (ROOT / "docs").glob("*.md")}
    for page in (readme, *(ROOT / "docs").glob("*.md")):
        for target, anchor in re.findall(r"\]\(([\w./-]+\.md)(?:#([\w-]+))?\)", page.read_text(encoding="utf-8")):
            path = (page.parent / target).resolve()
            assert path.is_file(), f"{page.name} links {target}, which is missing"
            assert not anchor or anchor in anchors(path.read_text(encoding="utf-8")), f"{page.name}: {target}#{anchor}"
