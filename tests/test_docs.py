"""What a reader follows must lead somewhere: every `method.md §N` citation in the code, the
tests and the docs names a section of docs/method.md, and every relative link or image in
README.md and docs/ names a file that exists. (The README's command lines are checked
against the scripts' own options in test_readme.py.)"""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
METHOD = ROOT / "docs" / "method.md"
CITATION = re.compile(r"method\.md §(\d+(?:\.\d+)?(?:(?:, ?|[-–])\d+(?:\.\d+)?)*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def sections(text):
    """Section numbers of method.md's numbered headings: '## 4. ...' -> '4', '### 4.2 ...'."""
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.M))


def cited(text):
    """Every section number a text cites, ranges expanded: '§6-8, 12' -> 6, 7, 8, 12."""
    out = []
    for group in CITATION.findall(text):
        for part in re.split(r", ?", group):
            ends = re.split(r"[-–]", part)
            if len(ends) == 2 and "." not in part:
                out += [str(n) for n in range(int(ends[0]), int(ends[1]) + 1)]
            else:
                out += ends
    return out


def broken_links(path):
    """Relative link and image targets in a markdown file that name no file."""
    bad = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue                                     # a web address or an anchor
        if not (path.parent / target.split("#")[0]).exists():
            bad.append(target)
    return bad


def readers_files():
    files = [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("docs/*.md"),
             ROOT / "README.md", ROOT / ".ci" / "run"]
    return [f for f in files if f.exists()]


def test_every_citation_names_a_section_of_method_md():
    known = sections(METHOD.read_text())
    assert {str(n) for n in range(1, 14)} | {"4.1", "4.2", "4.3"} <= known
    missing, count = [], 0
    for path in readers_files():
        text = path.read_text()
        assert not re.search(r"SPEC \d", text), f"{path.name} cites SPEC, which readers lack"
        for number in cited(text):
            count += 1
            if number not in known:
                missing.append((path.name, number))
    assert missing == [] and count > 100


def test_the_citation_check_can_fail():
    known = sections("## 1. Inputs\n\n### 4.2 Linear (ours)\n## 12. The recipe\n")
    assert known == {"1", "4.2", "12"}
    text = "see method.md §1, 4.2 and method.md §12-13; method.md " + "§99"   # not cited here
    assert cited(text) == ["1", "4.2", "12", "13", "99"]
    assert [n for n in cited(text) if n not in known] == ["13", "99"]


def test_every_relative_link_and_image_points_somewhere(tmp_path):
    for path in [ROOT / "README.md", *ROOT.glob("docs/*.md")]:
        assert broken_links(path) == [], path.name
    page = tmp_path / "page.md"
    (tmp_path / "there.png").write_bytes(b"")
    page.write_text("[a](there.png) ![b](gone.png) [c](https://x.org/y) [d](#top) [e](no/where.md#s)")
    assert broken_links(page) == ["gone.png", "no/where.md#s"]
