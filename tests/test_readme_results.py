"""The results tables of docs/results.md (once the README's) are generated from benchmarks/results/*.json (issue
15): regenerating them must give exactly what the page holds, so no number there can drift from the measurement it
reports."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_readme_results_equal_the_json(capsys):
    import report

    rc = report.main(["--check"])
    assert rc == 0, capsys.readouterr().err


def test_the_check_catches_a_changed_number(tmp_path, monkeypatch):
    import report

    text = report.PAGE.read_text()
    assert report.PAGE == ROOT / "docs" / "results.md"
    block = text.split(report.BEGIN, 1)[1].split(report.END, 1)[0]
    assert "| goal | target | measured | status |" in block  # the goals table is generated too
    digit = next(i for i, ch in enumerate(block) if ch.isdigit())
    bad = block[:digit] + str((int(block[digit]) + 1) % 10) + block[digit + 1:]
    assert report.replace_block(text.replace(block, bad), report.render()) == text
