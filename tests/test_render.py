"""The renderers: terminal bars, --plot (PNG/SVG), --html in a real browser, qplan report.

Reports come from saved `qplan estimate --json` output (tests/data) so the renderers are
tested on what the planner really writes, without planning again; one end-to-end test
plans gpt2 through the CLI and checks that a saved report draws the same files.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from qplan.cli import app
from qplan.loading import read_report
from qplan.render.bars import cells, render_bars
from qplan.render.breakdown import bar_groups, components_present, sweeps
from qplan.render.fmt import style_of
from qplan.report import report_dict

DATA = Path(__file__).parent / "data"
SOLVE_REPORT = DATA / "report_gpt2_4gib_solve_batch.json"
MULTI_REPORT = DATA / "report_llama2_13b_2x4090.json"
BARS_SNAPSHOT = DATA / "bars_gpt2_4gib.txt"
MULTI_SNAPSHOT = DATA / "bars_llama2_13b_2x4090.txt"

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
needs_matplotlib = pytest.mark.skipif(
    not HAS_MATPLOTLIB, reason="matplotlib is not installed (pip install 'qplan[plot]')"
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium (apt-get install chromium)"
)


def plain_console(width: int = 100) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=width, highlight=False), buffer


def bars_text(report_path: Path) -> str:
    console, buffer = plain_console()
    render_bars(read_report(report_path), console)
    return buffer.getvalue()


def without_solutions(tmp_path: Path) -> Path:
    """The gpt2 plan alone (no --solve), as `estimate --json` writes it without --solve."""
    data = json.loads(SOLVE_REPORT.read_text())
    data["solutions"] = []
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


# --------------------------------------------------------------------------- terminal bars


def test_plain_bars_snapshot() -> None:
    """Not a terminal: ASCII glyphs, no colour codes; the exact text is the snapshot."""
    text = bars_text(SOLVE_REPORT)
    assert text == BARS_SNAPSHOT.read_text()
    assert "\x1b[" not in text and text.isascii()


def test_multi_gpu_bars_snapshot_busiest_device_first(tmp_path: Path) -> None:
    data = json.loads(MULTI_REPORT.read_text())
    data["devices"].reverse()  # the report's order must not matter: busiest first
    path = tmp_path / "multi.json"
    path.write_text(json.dumps(data))
    text = bars_text(path)
    assert text == MULTI_SNAPSHOT.read_text()
    lines = text.splitlines()
    devices = [line.split()[0] for line in lines if line.strip().startswith("cuda:")]
    assert devices == ["cuda:0", "cuda:1"]  # cuda:0 holds 21.32 GiB, cuda:1 7.94 GiB


def test_bar_cells_follow_the_bytes() -> None:
    """Each bar fills round(total / memory * width) cells; the usable line sits at the limit."""
    report = read_report(SOLVE_REPORT)
    for bar in bar_groups(report)[0].bars:
        for width in (20, 37, 60):
            kinds = cells(bar, width)
            filled = sum(1 for k in kinds if k not in ("", "/"))
            assert filled == round(bar.total_bytes / bar.scale_bytes * width)
            assert len(kinds) == width
    # The 4 GiB GPU: usable line at 3.80 GiB = 4 GiB - 5% headroom.
    assert bar.limit_bytes == report.gpu.usable_bytes + report.gpu.cuda_context_bytes
    assert bar.limit_bytes == 4 * 1024**3 - report.gpu.headroom_bytes


def test_no_color_gives_ascii_even_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    buffer = io.StringIO()
    render_bars(read_report(SOLVE_REPORT), Console(file=buffer, width=100, force_terminal=True))
    assert "\x1b[" not in buffer.getvalue().replace("\x1b[1m", "").replace("\x1b[0m", "")
    assert "[##" in buffer.getvalue() and "█" not in buffer.getvalue()


def test_colour_terminal_draws_coloured_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    buffer = io.StringIO()
    console = Console(file=buffer, width=100, force_terminal=True, color_system="truecolor")
    render_bars(read_report(SOLVE_REPORT), console)
    text = buffer.getvalue()
    assert "█" in text and "┃" in text
    assert "\x1b[38;2;78;121;167m" in text  # weights' colour, #4e79a7


def test_estimate_prints_bars_under_the_table() -> None:
    result = invoke("report", str(SOLVE_REPORT))
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.index("nf4-dq    │") < out.index("a bar is 4.00 GiB") < out.index("Recommendation")
    assert "  bf16   [" in out and "<- recommended" in out


# --------------------------------------------------------------------------- plot


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def svg_texts(path: Path) -> tuple[ET.Element, str]:
    root = ET.fromstring(path.read_text())
    text = " ".join("".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text"))
    return root, text


@needs_matplotlib
@pytest.mark.parametrize("kind", ["plan", "sweep"])
def test_plot_png_and_svg(tmp_path: Path, kind: str) -> None:
    from qplan.render.plot import DPI, figure_size, pixel_size

    source = SOLVE_REPORT if kind == "sweep" else without_solutions(tmp_path)
    report = read_report(source)
    assert bool(sweeps(report)) == (kind == "sweep")
    png, svg = tmp_path / "plan.png", tmp_path / "plan.svg"
    result = invoke("report", str(source), "--plot", str(png))
    assert result.exit_code == 0, result.output
    assert invoke("report", str(source), "--plot", str(svg)).exit_code == 0
    width, height = figure_size(report)
    # 8 candidates: 1.5 + 8 * 0.42 in for the bars, + 3.6 in for the sweep, + 0.6 title.
    expected_height = 1.5 + 8 * 0.42 + 0.6 + (3.6 if kind == "sweep" else 0)
    assert (width, height) == (10.0, round(expected_height, 2))
    assert png_size(png) == pixel_size(report) == (1000, round(expected_height * DPI))
    assert 20_000 < png.stat().st_size < 400_000
    root, text = svg_texts(svg)
    assert root.get("width") == f"{width * 72:g}pt" and root.get("height") == f"{height * 72:g}pt"
    assert 10_000 < svg.stat().st_size < 400_000
    names = components_present(report)
    assert set(names) == {"weights", "kv_cache", "activations", "transients", "allocator",
                          "cuda_context"}
    for name in names:
        assert style_of(name).label in text, name
    for c in report.candidates:
        assert c.precision in text
    assert "usable line (3.80 GiB)" in text
    if kind == "sweep":
        for s in report.solutions:
            assert f"{s.precision}: --batch {s.value:,}" in text
    # Deterministic: drawing again gives the same bytes.
    again_png, again_svg = tmp_path / "again.png", tmp_path / "again.svg"
    assert invoke("report", str(source), "--plot", str(again_png)).exit_code == 0
    assert invoke("report", str(source), "--plot", str(again_svg)).exit_code == 0
    assert again_png.read_bytes() == png.read_bytes()
    assert again_svg.read_bytes() == svg.read_bytes()


@needs_matplotlib
def test_plot_of_a_multi_gpu_plan_has_the_device_panel(tmp_path: Path) -> None:
    svg = tmp_path / "multi.svg"
    assert invoke("report", str(MULTI_REPORT), "--plot", str(svg)).exit_code == 0
    _, text = svg_texts(svg)
    assert "per device (bf16, device_map), busiest first" in text
    assert "cuda:0" in text and "cuda:1" in text


def test_plot_without_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    result = invoke("report", str(SOLVE_REPORT), "--plot", str(tmp_path / "x.png"))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and 'pip install "qplan[plot]"' in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_plot_rejects_other_suffixes(tmp_path: Path) -> None:
    result = invoke("report", str(SOLVE_REPORT), "--plot", str(tmp_path / "x.jpg"))
    assert result.exit_code == 2 and ".png or .svg" in result.output


# --------------------------------------------------------------------------- html


def test_html_is_self_contained_with_the_json_embedded(tmp_path: Path) -> None:
    out = tmp_path / "plan.html"
    result = invoke("report", str(SOLVE_REPORT), "--html", str(out))
    assert result.exit_code == 0, result.output
    page = out.read_text()
    # Nothing to fetch: no external scripts, styles, images or fonts.
    assert not re.search(r"\b(src|href)\s*=", page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert "<script>" not in page and "<script src" not in page  # only the JSON data block
    embedded = re.search(r'<script type="application/json" id="qplan-report">(.*?)</script>',
                         page, re.S)
    assert embedded is not None
    assert json.loads(embedded.group(1)) == report_dict(read_report(SOLVE_REPORT))
    assert 'name="viewport"' in page
    # The recommendation's kwargs and the transformers snippet, in copyable blocks.
    assert page.count('<pre class="copy">') == 2 and "--emit transformers (python)" in page


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


@needs_chromium
@pytest.mark.parametrize("source", [SOLVE_REPORT, MULTI_REPORT], ids=["single", "multi"])
def test_html_in_a_real_browser(tmp_path: Path, source: Path) -> None:
    page = tmp_path / "plan.html"
    assert invoke("report", str(source), "--html", str(page)).exit_code == 0
    report = read_report(source)
    url = page.as_uri()
    dom = run_chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    rows = re.findall(r'<tr(?: class="chosen")? data-precision="([^"]+)"', html)
    assert rows == [c.precision for c in report.candidates]
    segments = re.findall(r'<rect class="seg seg-([a-z_]+)" data-component="\1" '
                          r'data-bytes="(\d+)"', html)
    expected = [(s.component, str(s.bytes)) for g in bar_groups(report) for b in g.bars
                for s in b.segments]
    assert segments == expected and len(segments) >= 8 * 5
    assert html.count('class="limit"') >= len(report.candidates)
    assert 'id="recommendation"' in html and report.recommendation.precision in html
    for width, height in ((1280, 1600), (390, 844)):  # a desktop, and a phone
        shot = tmp_path / f"shot-{width}.png"
        done = run_chromium(tmp_path, f"--screenshot={shot}", f"--window-size={width},{height}",
                            url)
        assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
        assert png_size(shot) == (width, height)
        assert shot.stat().st_size > 30_000  # a rendered page, not a blank one


# --------------------------------------------------------------------------- qplan report


def one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ('{"schema": "someone.else/v3", "rows": []}', ("not a qplan report", "someone.else/v3")),
        ("not json at all", ("is not valid JSON",)),
        ("[1, 2]", ("not a JSON object",)),
        ('{"schema": "qplan.report/v1", "model": {}}', ("report",)),
    ],
    ids=["other-schema", "not-json", "not-object", "incomplete"],
)
def test_report_rejects_files_that_are_not_reports(
    tmp_path: Path, content: str, needles: tuple[str, ...]
) -> None:
    path = tmp_path / "x.json"
    path.write_text(content)
    one_line_error(invoke("report", str(path), "--html", str(tmp_path / "x.html")), 1, *needles)
    assert not (tmp_path / "x.html").exists()


def test_report_rejects_a_malformed_field(tmp_path: Path) -> None:
    data = json.loads(SOLVE_REPORT.read_text())
    data["candidates"][0]["components"]["weights"] = "lots"
    path = tmp_path / "x.json"
    path.write_text(json.dumps(data))
    one_line_error(invoke("report", str(path)), 1, "components", "weights")


def test_report_missing_file() -> None:
    one_line_error(invoke("report", "/no/such/plan.json"), 1, "cannot read report")


def test_report_emits_and_reprints_json() -> None:
    result = invoke("report", str(SOLVE_REPORT), "--emit", "transformers")
    assert result.exit_code == 0 and "from_pretrained(" in result.output
    result = invoke("report", str(SOLVE_REPORT), "--json")
    assert json.loads(result.output) == report_dict(read_report(SOLVE_REPORT))


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_estimate_writes_plot_and_html_that_report_redraws_identically(tmp_path: Path) -> None:
    """One real plan with --solve; `qplan report` on its JSON draws the very same files."""
    files = {"json": tmp_path / "p.json", "html": tmp_path / "p.html"}
    args = ["estimate", "gpt2", "--gpu", "4GiB", "--seq-len", "128", "--solve", "batch",
            "--precisions", "bf16,nf4", "-o", str(files["json"]), "--html", str(files["html"])]
    plotting = HAS_MATPLOTLIB
    if plotting:
        files["svg"] = tmp_path / "p.svg"
        args += ["--plot", str(files["svg"])]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    report = read_report(files["json"])
    for s in report.solutions:  # every traced point is kept, the answer among them
        assert len(s.points) == s.evaluations >= 3
        assert (s.value, s.needed_bytes) in s.points
        assert [x for x, _ in s.points] == sorted(x for x, _ in s.points)
    assert "a bar is 4.00 GiB" in result.output
    redraw = {"html": tmp_path / "r.html", "svg": tmp_path / "r.svg"}
    args = ["report", str(files["json"]), "--html", str(redraw["html"])]
    if plotting:
        args += ["--plot", str(redraw["svg"])]
    assert invoke(*args).exit_code == 0
    assert redraw["html"].read_bytes() == files["html"].read_bytes()
    if plotting:
        assert redraw["svg"].read_bytes() == files["svg"].read_bytes()
