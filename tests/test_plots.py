"""The pictures: train's loss curve and bench's speed chart as PNG files drawn from the CSVs the stages write,
tracked by DVC as image plots that `dvc plots show` shows without a network, and logged to MLflow."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from pipeline_helpers import DVC, FAST_STAGES, make_project, run

from gptcore import plots
from gptcore.plots import CUTILE_COLOR, LR_COLOR, TORCH_COLOR, TRAIN_COLOR, VAL_COLOR, read_rows, save_png

LOSS_CSV = "iter,train_loss,val_loss,lr\n0,4.2,4.3,1e-4\n10,3.1,3.3,1e-3\n20,2.5,2.8,5e-4\n30,2.2,2.6,1e-4\n"
BENCH_CSV = (
    "benchmark,speedup,ms\n"
    "train_step B16xT16 float32 | torch eager,1.0,3.0\n"
    "train_step B16xT16 float32 | cutile,1.5,2.0\n"
    "decode b1 float16 | torch kv_cache,1.0,0.5\n"
    "decode b1 float16 | cutile kv_cache,0.8,0.625\n"
)


def rgb(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))


def pixels_of(png, color: str) -> int:
    """How many pixels of the picture have exactly this colour (the lines and bars are drawn in it)."""
    image = Image.open(png).convert("RGB")
    return sum(count for count, pixel in image.getcolors(maxcolors=1 << 20) if pixel == rgb(color))


def test_the_loss_curve_draws_the_csv_rows(tmp_path):
    csv_path = tmp_path / "train_loss.csv"
    csv_path.write_text(LOSS_CSV)
    fig = plots.loss_figure(read_rows(csv_path))
    loss_axis, lr_axis = fig.axes
    curves = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in loss_axis.get_lines()}
    assert curves == {
        "train loss": ([0, 10, 20, 30], [4.2, 3.1, 2.5, 2.2]),
        "val loss": ([0, 10, 20, 30], [4.3, 3.3, 2.8, 2.6]),
    }
    (lr,) = lr_axis.get_lines()
    assert list(lr.get_ydata()) == [1e-4, 1e-3, 5e-4, 1e-4] and lr_axis.get_ylabel() == "learning rate"

    png = plots.write_loss_curve(csv_path, tmp_path / "pics" / "loss.png")  # its folder made too
    image = Image.open(png)
    assert image.format == "PNG" and image.size == (800, 450)
    for color in (TRAIN_COLOR, VAL_COLOR, LR_COLOR):  # both loss curves and the lr line are in the picture
        assert pixels_of(png, color) > 100, color
    assert [p.name for p in png.parent.iterdir()] == ["loss.png"]  # no temp file left beside it


def test_the_speed_chart_has_one_bar_per_row_cutile_apart_from_torch(tmp_path):
    csv_path = tmp_path / "bench.csv"
    csv_path.write_text(BENCH_CSV)
    fig = plots.speed_figure(read_rows(csv_path))
    (ax,) = fig.axes
    bars = ax.patches
    assert [bar.get_width() for bar in bars] == [1.0, 1.5, 1.0, 0.8]
    from matplotlib.colors import to_hex

    assert [to_hex(bar.get_facecolor()) for bar in bars] == [TORCH_COLOR, CUTILE_COLOR, TORCH_COLOR, CUTILE_COLOR]
    assert [t.get_text() for t in ax.get_yticklabels()] == [row["benchmark"] for row in read_rows(csv_path)]

    png = plots.write_speed_chart(csv_path, tmp_path / "bench.png")
    assert Image.open(png).format == "PNG"
    assert pixels_of(png, TORCH_COLOR) > 100 and pixels_of(png, CUTILE_COLOR) > 100


def test_a_bench_without_measured_rows_still_draws_its_chart(tmp_path):
    """Every row skipped: the CSV is empty, and the chart says so rather than leaving DVC an output missing."""
    (tmp_path / "bench.csv").write_text("")
    fig = plots.speed_figure(read_rows(tmp_path / "bench.csv"))
    (ax,) = fig.axes
    assert len(ax.patches) == 0 and [t.get_text() for t in ax.texts] == ["no measured rows: see bench/records.json"]
    png = plots.write_speed_chart(tmp_path / "bench.csv", tmp_path / "bench.png")
    assert Image.open(png).format == "PNG"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project after `dvc repro bench` (prepare, train, bench: the stages that draw)."""
    proj = make_project(tmp_path_factory.mktemp("plots") / "proj", **FAST_STAGES)
    run(DVC + ["repro", "bench"], proj, timeout=900)
    return proj


def same_as_redrawn(png, figure, tmp_path) -> bool:
    """Whether a stage's picture is byte for byte the figure drawn here (matplotlib's PNG is deterministic)."""
    return png.read_bytes() == save_png(figure, tmp_path / "redrawn.png").read_bytes()


@pytest.mark.slow
def test_the_stages_draw_their_csvs(project, tmp_path):
    loss_png, bench_png = project / "plots" / "loss.png", project / "plots" / "bench.png"
    assert Image.open(loss_png).format == "PNG" and Image.open(loss_png).size == (800, 450)
    rows = read_rows(project / "plots" / "train_loss.csv")
    assert [int(r["iter"]) for r in rows] == [0, 10, 20, 30]  # the tiny train's evaluations
    assert same_as_redrawn(loss_png, plots.loss_figure(rows), tmp_path)
    bench_rows = read_rows(project / "plots" / "bench.csv")
    assert [r["benchmark"].rpartition(" | ")[2] for r in bench_rows] == ["torch eager"]  # the CPU's one row
    assert same_as_redrawn(bench_png, plots.speed_figure(bench_rows), tmp_path)


@pytest.mark.slow
def test_dvc_plots_show_draws_the_pictures_offline(project):
    """The pictures are image plots: `dvc plots show` copies them beside its page and shows them from there
    (its Vega charts need the internet); no chart draws a column against the row number."""
    out = run(DVC + ["plots", "show"], project)
    page = project / "dvc_plots" / "index.html"
    assert str(page) in out.stdout
    html = page.read_text()
    for name in ("loss", "bench"):
        assert f'<img src="static/workspace_plots_{name}.png">' in html
        shown = project / "dvc_plots" / "static" / f"workspace_plots_{name}.png"
        assert shown.read_bytes() == (project / "plots" / f"{name}.png").read_bytes()
    shown = json.loads(run(DVC + ["plots", "show", "--json"], project).stdout)["data"]
    x_fields = {
        name: chart["content"]["encoding"]["x"]["field"]
        for name, charts in shown.items()
        for chart in charts
        if chart["type"] == "vega"
    }
    assert x_fields == {"plots/train_loss.csv": "iter", "Learning rate": "iter", "plots/bench.csv": "speedup"}
    assert {name for name, charts in shown.items() if charts[0]["type"] == "image"} == {
        "plots/loss.png",
        "plots/bench.png",
    }


@pytest.mark.slow
def test_mlflow_keeps_each_picture_with_its_run(project):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gptcore")
    runs = {r.data.tags["dvc.stage"]: r for r in client.search_runs([experiment.experiment_id])}
    for stage, picture in (("train", "loss.png"), ("bench", "bench.png")):
        artifacts = {a.path for a in client.list_artifacts(runs[stage].info.run_id)}
        assert picture in artifacts, (stage, artifacts)
        logged = project / "mlruns" / "gptcore" / runs[stage].info.run_id / "artifacts" / picture
        assert logged.read_bytes() == (project / "plots" / picture).read_bytes()
