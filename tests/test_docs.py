"""The markdown's relative links and anchors resolve (tools/check_docs.py), and the checker catches broken ones."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKER = os.path.join(ROOT, "tools", "check_docs.py")


def run_checker(root):
    return subprocess.run([sys.executable, CHECKER, str(root)], capture_output=True, text=True, timeout=120)


def test_repository_docs_links_and_anchors_resolve():
    result = run_checker(ROOT)
    assert result.returncode == 0, "tools/check_docs.py found broken links:\n" + result.stdout + result.stderr


def test_checker_reports_a_broken_link_and_a_broken_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Some `code`: here\n\ntext\n")
    (tmp_path / "README.md").write_text(
        "# Title\n"
        "\n"
        "[fine](docs/page.md#some-code-here) and [fine too](#title)\n"
        "[missing file](docs/missing.md)\n"
        "[missing anchor](docs/page.md#no-such-heading)\n"
        "`[in code](nowhere.md)` and [web](https://example.com/x.md)\n"
        "\n"
        "```\n"
        "[in a fence](nowhere.md)\n"
        "```\n"
    )
    result = run_checker(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith("README.md:4: docs/missing.md (no such file")
    assert lines[1].startswith("README.md:5: docs/page.md#no-such-heading (no heading")


def test_checker_accepts_github_slugs_and_duplicates(tmp_path):
    (tmp_path / "README.md").write_text(
        "# Every model (`mmdcnv2.mmcv_ops`)\n"
        "## Export, determinism, robustness\n"
        "## Notes\n"
        "## Notes\n"
        "\n"
        "[a](#every-model-mmdcnv2mmcv_ops) [b](#export-determinism-robustness) [c](#notes) [d](#notes-1)\n"
        '![img](pic.png) <img src="pic.png">\n'
    )
    (tmp_path / "pic.png").write_bytes(b"")
    result = run_checker(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 relative links" in result.stdout
