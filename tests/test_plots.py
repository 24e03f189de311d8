"""Plots: every probe curve against log tokens, inflection marks, heatmaps, PNGs for any logger."""

import dataclasses
import io
import itertools
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
from conftest import make_module, make_trainer, reference_batches, train_loader
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from matplotlib.collections import QuadMesh
from matplotlib.colors import to_rgb
from matplotlib.patches import Rectangle

from lightning_overtrain import NoiseProbe, OvertrainingMonitor, keys
from lightning_overtrain.history import infer_signals, read_history, write_history
from lightning_overtrain.inflection.policy import InflectionPolicy
from lightning_overtrain.reporting import figure_style, figures
from lightning_overtrain.reporting.base import RunView
from lightning_overtrain.reporting.console import format_snapshot
from lightning_overtrain.reporting.png import PlotReporter
from lightning_overtrain.reporting.wandb import WandbReporter

PERTURBED = "noise/gamma=1/perturbed_loss"
FT_LOSS = "finetune/lr=0.001/reference_loss_after"
FT_DOWN = "finetune/lr=0.001/downstream_loss_after"
LAYERS = ("wte", "h.0", "h.1")


def history(n=8, noise=True, finetune=False, layers=False, marks=False):
    """A run's records shaped like the paper's curves, with the keys each engineer emits."""
    records = []
    for i in range(n):
        tokens = 1e5 * 10 ** (i / 4)
        ref = 2.0 + 3 * (tokens / 1e5) ** -0.4
        r = {"tokens": int(tokens), "step": 10 * i, "reference_loss": ref}
        if noise:
            for g in (0.5, 1.0):
                delta = 0.05 * g * (tokens / 1e5) ** 0.35
                r[f"noise/gamma={g:g}/perturbed_loss"] = ref + delta
                r[f"noise/gamma={g:g}/perturbed_loss_stderr"] = 0.1 * delta
                r[f"noise/gamma={g:g}/delta"] = delta
                r[f"noise/gamma={g:g}/delta_stderr"] = 0.1 * delta
        if layers:
            for g in (0.5, 1.0):
                for k, layer in enumerate(LAYERS):
                    r[f"noise/gamma={g:g}/layer={layer}/delta"] = (k + 1) * g * i
        if finetune:
            for lr in (1e-4, 1e-3):
                r[f"finetune/lr={lr:g}/forgetting"] = 0.3 + i * lr
                r[f"finetune/lr={lr:g}/reference_loss_after"] = ref + 0.3
                r[f"finetune/lr={lr:g}/downstream_loss_after"] = 3 - 0.1 * i
        if marks and i >= n // 2:
            r[f"inflection/{PERTURBED}/crossed"] = float(i == n - 1)
            r[f"inflection/{PERTURBED}/bottom_tokens"] = 1e6
            r[f"inflection/{PERTURBED}/forecast_tokens"] = 2e6
            r[f"inflection/{PERTURBED}/forecast_low"] = 8e5
            r[f"inflection/{PERTURBED}/forecast_high"] = math.inf
        records.append(r)
    return records


def judged(records):
    """The records with the default policy's ``inflection/...`` fields, as a live run has them."""
    policy = InflectionPolicy()
    policy.declare(infer_signals(records[0]))  # as the monitor declares its probes'
    return [{**r, **policy.judge(r).additions} for r in records]


def curve(shape, n=9, gamma=1.0):
    """Noise-probe records whose perturbed loss is ``"falling"``, ``"rising"`` or ``"u"``."""
    records = []
    for i in range(n):
        tokens = 1e5 * 10 ** (i / 4)
        scale = {"falling": 3.0, "rising": 0.1, "u": 3.0}[shape]
        ref = 2 + scale * (tokens / 1e5) ** (-0.8 if shape == "u" else -0.4)
        delta = {"falling": 0.01, "rising": 0.05 * i, "u": 0.1 * (tokens / 1e5) ** 0.5}[shape]
        records.append(
            {
                "tokens": int(tokens),
                "reference_loss": ref,
                keys.noise_key(gamma, "perturbed_loss"): ref + delta,
                keys.noise_key(gamma, "perturbed_loss") + "_stderr": 0.002,
                keys.noise_key(gamma, "delta"): delta,
                keys.noise_key(gamma, "delta") + "_stderr": 0.002,
            }
        )
    return judged(records)


def rings(ax):
    return [line for line in ax.lines if line.get_markersize() == figure_style.RING_SIZE]


def beyond_texts(ax):
    return [line.get_label() for line in ax.lines if line.get_gid() == figure_style.BEYOND_GID]


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def not_crossed(records):
    records = [dict(r) for r in records]
    records[-1][f"inflection/{PERTURBED}/crossed"] = 0.0
    return records


def noise_figure(records):
    return figures.render_figures(records)["noise"]


def finetune_figure(records):
    return figures.render_figures(records)["finetune"]


def layers_figure(records):
    return figures.render_figures(records)["layers"]


def vertical_lines(ax):
    return [
        line.get_xdata()[0]
        for line in ax.lines
        if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2
    ]


def spans(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle) and p.get_height() == 1]


def test_draws_only_the_figures_the_records_have_data_for():
    assert figures.render_figures([]) == {}
    assert set(figures.render_figures(history(noise=False))) == {
        "noise"
    }  # the reference loss alone
    assert set(figures.render_figures(history())) == {"noise"}
    both = figures.render_figures(history(finetune=True, layers=True))
    assert set(both) == {"noise", "finetune", "layers"}
    only_finetune = [
        {k: v for k, v in r.items() if not k.startswith("noise")} for r in history(finetune=True)
    ]
    assert set(figures.render_figures(only_finetune)) == {"noise", "finetune"}


def test_every_curve_is_against_log_tokens():
    rendered = figures.render_figures(history(finetune=True, layers=True))
    for name, fig in rendered.items():
        for ax in fig.axes:
            if ax.get_label() != "<colorbar>":
                assert ax.get_xscale() == "log", name


def test_noise_figure_plots_each_gamma_and_the_reference():
    fig = noise_figure(history())
    loss_ax, delta_ax = fig.axes
    labels = [line.get_label() for line in loss_ax.lines]
    assert labels == ["reference", "γ=0.5", "γ=1"]
    assert [line.get_label() for line in delta_ax.lines] == ["γ=0.5", "γ=1"]
    tokens, values, _ = figures.series(history(), "noise/gamma=1/delta")
    assert list(delta_ax.lines[1].get_xdata()) == tokens
    assert list(delta_ax.lines[1].get_ydata()) == values


def test_finetune_figure_draws_the_panels_present_in_any_subset():
    records = [
        {k: v for k, v in r.items() if "downstream" not in k} for r in history(finetune=True)
    ]
    fig = finetune_figure(records)
    assert [ax.get_title() for ax in fig.axes] == [
        "forgetting (pretraining loss rise)",
        "pretraining loss after fine-tuning",
    ]
    assert [line.get_label() for line in fig.axes[0].lines] == ["lr=0.0001", "lr=0.001"]


def test_a_crossed_curve_gets_a_filled_ring_and_no_forecast():
    # As the console: a turn measured ("TURNED UP") is not forecast any more.
    loss_ax = noise_figure(history(marks=True)).axes[0]
    assert vertical_lines(loss_ax) == [] and spans(loss_ax) == []
    (ring,) = rings(loss_ax)
    assert ring.get_xdata()[0] == 1e6 and ring.get_fillstyle() == "full"
    assert "γ=1 (crossed: TURNED UP)" in [line.get_label() for line in loss_ax.lines]
    assert figure_style.BOTTOM_STATES["crossed"] in legend_texts(loss_ax)


def test_a_forecast_ahead_is_drawn_with_its_interval():
    records = not_crossed(with_forecast(history(marks=True), 6e6, 5.8e6, 6.4e6))  # latest 5.6M
    loss_ax = noise_figure(records).axes[0]
    assert vertical_lines(loss_ax) == [6e6]
    (span,) = spans(loss_ax)
    assert span.get_x() == pytest.approx(5.8e6)
    assert span.get_x() + span.get_width() == pytest.approx(6.4e6)
    assert {"forecast turn T* (dashed)", "T* interval"} <= set(legend_texts(loss_ax))
    (ring,) = rings(loss_ax)
    assert ring.get_markerfacecolor() == "none"  # the lowest so far: an open ring


def test_a_forecast_in_the_past_is_not_drawn():
    # The console quotes only a forecast ahead of the latest snapshot; so does the figure.
    records = not_crossed(with_forecast(history(marks=True), 2e6, 8e5, 3e6))
    loss_ax = noise_figure(records).axes[0]
    assert vertical_lines(loss_ax) == [] and spans(loss_ax) == [] and beyond_texts(loss_ax) == []


def test_a_rise_above_the_noise_half_fills_the_ring_in_the_consoles_words():
    records = not_crossed(history(marks=True))
    records[-1][keys.inflection_key(PERTURBED, "rise")] = 0.5
    records[-1][keys.inflection_key(PERTURBED, "rise_threshold")] = 0.1
    loss_ax = noise_figure(records).axes[0]
    (ring,) = rings(loss_ax)
    assert ring.get_fillstyle() == "left"
    assert "γ=1 (rising above its bottom)" in legend_texts(loss_ax)
    assert "rising above its bottom" in format_snapshot(records[-1])  # the same words


def test_no_marks_without_inflection_keys():
    loss_ax = noise_figure(history())
    assert vertical_lines(loss_ax.axes[0]) == [] and spans(loss_ax.axes[0]) == []


def test_inflection_reads_the_latest_values_and_an_open_interval():
    records = history(marks=True)
    mark = figures.inflection(records, PERTURBED)
    assert mark == figures.Inflection(True, 1e6, 2e6, 8e5, None)
    assert figures.inflection(records[:-1], PERTURBED).crossed is False
    assert figures.inflection(records, "noise/gamma=0.5/perturbed_loss") is None
    # Through history.jsonl an infinite bound becomes null, then NaN: still open.
    records[-1][f"inflection/{PERTURBED}/forecast_high"] = float("nan")
    assert figures.inflection(records, PERTURBED).forecast_high is None


def test_series_skips_missing_non_finite_and_zero_tokens():
    records = [
        {"tokens": 0, "x": 1.0},
        {"tokens": 10, "x": float("nan")},
        {"tokens": 20},
        {"tokens": 30, "x": 2.0, "x_stderr": 0.1},
        {"tokens": 40, "x": 3.0},
    ]
    assert figures.series(records, "x") == ([30.0, 40.0], [2.0, 3.0], [0.1, None])


def test_layer_heatmap_is_tokens_by_layer():
    records = history(n=5, layers=True)
    fig = layers_figure(records)
    heatmaps = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    meshes = [c for ax in heatmaps for c in ax.collections if isinstance(c, QuadMesh)]
    assert len(meshes) == 2  # one per gamma
    values = meshes[1].get_array()
    assert values.shape == (len(LAYERS), 5)
    assert values[2, 4] == records[4]["noise/gamma=1/layer=h.1/delta"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list(LAYERS)
    edges = meshes[0].get_coordinates()[0, :, 0]
    tokens = [r["tokens"] for r in records]
    assert all(a < t < b for a, t, b in zip(edges, tokens, edges[1:]))  # each column on its T


def test_write_figures_writes_pngs_atomically(tmp_path):
    paths = figures.write_figures(history(finetune=True), str(tmp_path / "plots"))
    assert set(paths) == {"noise", "finetune"}
    for path in paths.values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path / "plots")) == ["finetune.png", "noise.png"]


def test_render_pngs_reuses_a_render_of_the_same_history_only():
    records = history(n=4)
    first = figures.render_pngs(records)
    assert figures.render_pngs(records) is first
    records.append(history(n=5)[-1])
    assert figures.render_pngs(records) is not first


def test_plots_read_a_history_file_back(tmp_path):
    records = history(marks=True)
    records[2]["noise/gamma=1/delta"] = float("nan")
    write_history(records, str(tmp_path))
    back = read_history(str(tmp_path / "history.jsonl"))
    assert set(figures.render_figures(back)) == {"noise"}
    assert figures.inflection(back, PERTURBED).forecast_high is None


def test_plot_reporter_draws_when_due_and_at_the_end(tmp_path, monkeypatch):
    import lightning_overtrain.reporting.png as module

    clock = [0.0]
    monkeypatch.setattr(module, "monotonic", lambda: clock[0])

    reporter, view = PlotReporter(every_s=60), RunView(dirpath=str(tmp_path))
    reporter.setup(None, view)
    png = tmp_path / "plots" / "noise.png"
    for i, record in enumerate(history(n=3)):
        clock[0] = [10.0, 70.0, 80.0][i]
        view = dataclasses.replace(view, history=(*view.history, record))
        reporter.report(None, view, record)
        assert png.exists() == (i >= 1)
    assert reporter.paths == {"noise": str(png)}
    stamp = png.stat().st_mtime_ns
    reporter.teardown(None, view)  # the third snapshot was not drawn yet
    assert png.stat().st_mtime_ns != stamp


def test_plot_reporter_failure_is_a_warning(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(figures, "write_figures", broken)

    view = RunView(dirpath=str(tmp_path), history=history(n=2))
    reporter = PlotReporter(every_s=0)
    reporter.setup(None, view)
    with pytest.warns(UserWarning, match="rendering the plots .* failed .*no fonts"):
        reporter.report(None, view, view.history[-1])
    reporter.report(None, view, view.history[-1])  # silent once disabled


@pytest.mark.parametrize(
    "bad, match",
    [(dict(dpi=0), "`dpi`"), (dict(every_s=-1), "`every_s`"), (dict(subdir=""), "`subdir`")],
)
def test_plot_reporter_rejects_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        PlotReporter(**bad)


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["none", "csv", "tensorboard"])
def test_history_and_pngs_are_written_for_any_logger(tmp_path, code_text, logger):
    loggers = {
        "none": False,
        "csv": CSVLogger(tmp_path, name="csv"),
        "tensorboard": TensorBoardLogger(tmp_path, name="tb"),
    }
    monitor = OvertrainingMonitor(
        reference_batches(code_text, n=2),
        every_n_steps=2,
        probes=[NoiseProbe(gammas=(1.0,), pairs=1)],
    )
    trainer = make_trainer(tmp_path, [monitor], max_steps=4, logger=loggers[logger])
    trainer.fit(make_module(), train_loader(code_text))
    assert [type(r).__name__ for r in monitor.reporters] == [
        "LoggerReporter",
        "FileReporter",
        "PlotReporter",
        "ConsoleReporter",
    ]
    expected_root = str(tmp_path) if logger == "none" else trainer.log_dir
    assert monitor.dirpath == os.path.join(expected_root, "overtrain")
    assert len(read_history(os.path.join(monitor.dirpath, "history.jsonl"))) == 2
    assert os.listdir(os.path.join(monitor.dirpath, "plots")) == ["noise.png"]


@pytest.mark.slow
def test_matplotlib_stays_optional(tmp_path):
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys

        import lightning.pytorch  # imports matplotlib itself (through torchmetrics) when present
        # The demo model, before the hiding: with accelerate installed (the `hf` extra),
        # transformers looks W&B up itself; only this package must do without it.
        from transformers import GPT2Config, GPT2LMHeadModel  # noqa: F401

        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("matplotlib", "wandb"):
                    raise ModuleNotFoundError(name)

        for name in [m for m in sys.modules if m.split(".")[0] in ("matplotlib", "wandb")]:
            del sys.modules[name]
        sys.meta_path.insert(0, Hide())
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from conftest import make_module, make_trainer, reference_batches, train_loader
        from lightning_overtrain import OvertrainingMonitor
        from lightning_overtrain.reporting import figures  # noqa: F401  (no matplotlib needed)
        from lightning_overtrain.testing.demo import stdlib_code

        text = stdlib_code(max_bytes=50_000)
        monitor = OvertrainingMonitor(reference_batches(text, n=1), every_n_steps=1)
        trainer = make_trainer({str(tmp_path)!r}, [monitor], max_steps=1)
        trainer.fit(make_module(), train_loader(text))
        print([type(r).__name__ for r in monitor.reporters], len(monitor.history))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        out.stdout.strip().splitlines()[-1]
        == "['LoggerReporter', 'FileReporter', 'ConsoleReporter'] 1"
    )
    assert (tmp_path / "overtrain" / "history.jsonl").exists()


def with_forecast(records, tokens, low, high, signal=PERTURBED):
    records = [dict(r) for r in records]
    for field, value in (
        ("forecast_tokens", tokens),
        ("forecast_low", low),
        ("forecast_high", high),
    ):
        records[-1][keys.inflection_key(signal, field)] = value
    return records


def test_a_far_forecast_is_cut_at_the_edge_and_written_there():
    records = not_crossed(with_forecast(history(marks=True), 1e9, 5e7, 2e9))  # data: 1e5-5.6e6
    loss_ax = noise_figure(records).axes[0]
    low, high = loss_ax.get_xlim()
    assert 1e5 / 1.5 < low < 1e5 and 5.6e6 < high < 5.6e6 * 1.5  # the data, not 1e9
    assert vertical_lines(loss_ax) == [] and spans(loss_ax) == []
    # 1e9 is beyond 10x the latest snapshot: an extrapolation, said as the console says it.
    assert beyond_texts(loss_ax) == ["γ=1: T* beyond 10x the observed tokens →"]
    near = not_crossed(with_forecast(history(marks=True), 2e7, 3e6, 4e7))
    assert beyond_texts(noise_figure(near).axes[0]) == ["γ=1: T* 20M [3M, 40M] →"]


def test_an_open_interval_runs_to_the_axis_edge_and_ends_in_an_arrow():
    records = not_crossed(with_forecast(history(marks=True), 6e6, 5.8e6, math.inf))
    loss_ax = noise_figure(records).axes[0]
    (span,) = spans(loss_ax)
    assert span.get_x() + span.get_width() == pytest.approx(loss_ax.get_xlim()[1])
    assert loss_ax.get_xlim()[1] < 5.6e6 * 1.5
    assert beyond_texts(loss_ax) == ["γ=1: T* interval runs past the axis (open above) →"]
    (arrow,) = [line for line in loss_ax.lines if line.get_gid() == figure_style.BEYOND_GID]
    assert arrow.get_marker() == "$→$" and arrow.get_visible()


def test_plot_signal_alone_keeps_the_axis_on_the_data():
    fig = figure_style.new_figure(1, "one")[0]
    ax = fig.axes[0]
    records = not_crossed(with_forecast(history(marks=True), 3e7, 1e7, None))
    assert figures.plot_signal(ax, records, PERTURBED, label="γ=1", color="C0")
    assert ax.get_xlim()[1] < 5.6e6 * 1.5 and beyond_texts(ax)


def drawn_tick_labels(fig, which):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    out = []
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        ticks = ax.xaxis.get_minor_ticks() if which == "minor" else ax.xaxis.get_major_ticks()
        low, high = ax.get_xlim()
        out.append(
            [
                (t.label1.get_text(), t.label1.get_window_extent(renderer))
                for t in ticks
                if t.label1.get_visible() and low <= t.get_loc() <= high
            ]
        )
    return out


@pytest.mark.parametrize("n", [1, 3, 6, 9, 25])  # one snapshot to six decades of tokens
def test_tokens_axis_has_readable_major_labels_only(n):
    records = history(n=n, finetune=True, layers=True)
    for fig in figures.render_figures(records).values():
        for labels in drawn_tick_labels(fig, "minor"):
            assert [text for text, _ in labels if text] == []
        for labels in drawn_tick_labels(fig, "major"):
            texts = [text for text, _ in labels]
            assert len(texts) >= 2 and all(re.fullmatch(r"\d+(k|M|B|T)?", t) for t in texts), texts
            for (_, a), (_, b) in itertools.pairwise(labels):
                assert a.x1 < b.x0, texts  # no two labels touch


@pytest.mark.parametrize(
    "shape, expected",
    [("falling", 0), ("rising", 0), ("u", 1)],
)
def test_a_ring_marks_a_real_bottom_only(shape, expected):
    records = curve(shape)
    mark = figures.inflection(records, PERTURBED)
    tokens = [r["tokens"] for r in records]
    # The detector's minimum of a monotone curve is one of its ends; of the U, inside.
    where = {"falling": tokens[-1], "rising": tokens[0]}
    if shape in where:
        assert mark.bottom_tokens == where[shape]
    else:
        assert tokens[0] < mark.bottom_tokens < tokens[-1]
    loss_ax = noise_figure(records).axes[0]
    assert len(rings(loss_ax)) == expected
    legend = legend_texts(loss_ax)
    assert (figure_style.BOTTOM_STATES[mark.state] in legend) == bool(expected)
    if expected:
        (ring,) = rings(loss_ax)
        assert ring.get_xdata()[0] == mark.bottom_tokens
        assert (ring.get_markerfacecolor() != "none") == (mark.state != "lowest")


def test_real_bottom_wants_a_snapshot_on_each_side():
    mark = figures.Inflection(False, 20.0, None, None, None)
    assert figures.real_bottom([10, 20, 30], mark) == 1
    assert figures.real_bottom([10, 20], mark) is None  # the last point
    assert figures.real_bottom([20, 30], mark) is None  # the first point
    assert figures.real_bottom([10, 25, 30], mark) is None  # not a drawn snapshot
    assert figures.real_bottom([10, 20, 30], None) is None


def test_every_panel_is_labelled_for_what_it_shows():
    rendered = figures.render_figures(history(finetune=True, layers=True))
    labels = {name: [ax.get_ylabel() for ax in fig.axes] for name, fig in rendered.items()}
    assert labels["noise"] == ["loss", "δ = perturbed − reference loss"]
    assert labels["finetune"] == ["Δ pretraining loss (after − before)", "loss", "loss"]
    assert labels["layers"] == ["layer"] * 2 + ["δ = perturbed − reference loss"] * 2  # colorbars
    for fig in rendered.values():
        assert all(ax.get_xlabel() == "tokens" for ax in fig.axes if ax.get_label() != "<colorbar>")
    mine = keys.Signal("mine/rate", unit="tokens / s", label="throughput", panel="speed")
    records = [{"tokens": 1000 * (i + 1), "mine/rate": 5.0 + i} for i in range(3)]
    (ax,) = figures.render_figures(records, [mine])["mine"].axes
    assert (ax.get_ylabel(), ax.get_title()) == ("tokens / s", "speed")


def test_line_colours_have_contrast_on_white():
    gammas, lrs = (0.01, 0.1, 0.25, 0.5, 1.0, 2.0), (1e-5, 1e-4, 3e-4, 1e-3, 3e-3)
    record = {"tokens": 1000, "reference_loss": 3.0}
    for g in gammas:
        record[keys.noise_key(g, "perturbed_loss")] = 3.1
        record[keys.noise_key(g, "delta")] = 0.1
    for lr in lrs:
        for quantity in keys.FINETUNE_QUANTITIES:
            record[keys.finetune_key(lr, quantity)] = 1.0
    records = [record, {**record, "tokens": 2000}]
    rendered = figures.render_figures(records)
    colors = [line.get_color() for fig in rendered.values() for ax in fig.axes for line in ax.lines]
    assert len(colors) == 2 * len(gammas) + 1 + 3 * len(lrs) + 1
    ratios = [figure_style.contrast_ratio(c) for c in colors]
    assert min(ratios) >= figure_style.MIN_CONTRAST == 3.0, ratios
    for fig, n in ((rendered["noise"], len(gammas)), (rendered["finetune"], len(lrs))):
        drawn = {to_rgb(line.get_color()) for ax in fig.axes for line in ax.lines}
        assert len(drawn - {to_rgb("black")}) == n  # one colour per gamma or lr
    # The old light end of the maps fails: the check can tell.
    assert figure_style.contrast_ratio("#fde725") < 3.0  # viridis(1)
    assert min(map(figure_style.contrast_ratio, figure_style.palette(4, "YlGn"))) >= 3.0


def test_contrast_ratio_is_wcag():
    assert figure_style.contrast_ratio("black") == pytest.approx(21.0)
    assert figure_style.contrast_ratio("white") == pytest.approx(1.0)
    assert figure_style.contrast_ratio("#767676") == pytest.approx(4.54, abs=0.01)


@pytest.mark.parametrize(
    "name, records",
    [
        ("first W&B image", history(n=1, noise=False)),
        (
            "tiny deltas",
            [
                {**r, "noise/gamma=1/delta": 1e-5 * (1 + i * 1e-3)}
                for i, r in enumerate(history(n=3))
            ],
        ),
        (
            "long tick labels",
            [{**r, "reference_loss": 12345.678 + i * 1e-3} for i, r in enumerate(history(n=4))],
        ),
        (
            "everything",
            with_forecast(history(n=9, finetune=True, layers=True, marks=True), 1e9, 1e8, None),
        ),
    ],
)
def test_no_text_is_cut_off_at_the_wandb_image_size(name, records):
    from PIL import Image

    dpi = WandbReporter().dpi
    for fig in figures.render_figures(records).values():
        png = figures.png_bytes(fig, dpi)  # exactly what W&B is sent
        width, height = Image.open(io.BytesIO(png)).size
        assert (width, height) == pytest.approx(tuple(fig.get_size_inches() * dpi), abs=1)
        fig.set_dpi(dpi)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        canvas = fig.bbox.padded(0.5)
        # Everything drawn (tick labels in view, legends, marks' texts) ...
        assert canvas.contains(*fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans).p0)
        assert canvas.contains(*fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans).p1)
        # ... and every label by name: "loss" stays "loss", not "oss".
        labels = [fig._suptitle] + [
            t for ax in fig.axes for t in (ax.xaxis.label, ax.yaxis.label, ax.title) if t.get_text()
        ]
        assert any("loss" in t.get_text() for t in labels)
        for text in labels:
            box = text.get_window_extent(renderer)
            assert canvas.contains(box.x0, box.y0) and canvas.contains(box.x1, box.y1), (
                name,
                text.get_text(),
                box,
            )


def tuned(records):
    """Fine-tune records with the tuned-lr view: at each snapshot the best of the lrs."""
    out = []
    for r in records:
        r = {**r, keys.finetune_key(1e-3, "downstream_loss_after"): r[FT_DOWN] - 0.05}
        best = min((1e-4, 1e-3), key=lambda lr: r[keys.finetune_key(lr, "downstream_loss_after")])
        r = dict(r)
        for quantity in ("downstream_loss_after", "reference_loss_after"):
            r[keys.finetune_tuned_key(quantity)] = r[keys.finetune_key(best, quantity)]
        r[keys.finetune_tuned_key("lr")] = best
        out.append(r)
    return out


def all_texts(fig):
    fig.canvas.draw()
    texts = [fig._suptitle.get_text()]
    for ax in fig.axes:
        texts += [t.get_text() for t in ax.texts]
        texts += [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
        texts += [line.get_label() for line in ax.lines]
        if ax.get_legend() is not None:
            texts += legend_texts(ax)
    return texts


def test_four_panels_are_a_readable_grid_not_a_strip():
    fig = finetune_figure(tuned(history(finetune=True)))
    width, height = fig.get_size_inches()
    assert len(fig.axes) == 4 and width / height < 2  # 2 x 2, not 1840x360
    rows = {round(ax.get_position().y0, 2) for ax in fig.axes}
    assert len(rows) == 2
    assert all(t.get_fontsize() >= 8 for ax in fig.axes for t in ax.get_xticklabels())


def test_the_tuned_lr_is_drawn_under_the_fixed_lrs_so_both_stay_visible():
    fig = finetune_figure(tuned(history(finetune=True)))
    downstream = fig.axes[2]
    by_label = {line.get_label(): line for line in downstream.lines}
    fixed, best = by_label["lr=0.001"], by_label["tuned lr"]
    assert list(best.get_ydata()) == list(fixed.get_ydata())  # the tuned lr picks lr=0.001 ...
    assert best.get_gid() == figure_style.SELECTION_GID  # ... and is a pale stroke ...
    assert (
        best.get_zorder() < fixed.get_zorder() and best.get_linewidth() > 3 * fixed.get_linewidth()
    )
    assert best.get_alpha() < 0.5  # ... under it, not an identical line on top


def test_a_flat_panel_spans_the_noise_band_and_says_flat():
    records = history(n=5)
    for r in records:
        r["noise/gamma=1/delta"] = 0.05 + 1e-6 * r["step"]
        r["noise/gamma=1/delta_stderr"] = 0.01
        r["noise/gamma=0.5/delta"] = 0.05
        r["noise/gamma=0.5/delta_stderr"] = 0.01
    delta_ax = noise_figure(records).axes[1]
    low, high = delta_ax.get_ylim()
    assert high - low >= 2 * 0.01
    assert [t.get_text() for t in delta_ax.texts if t.get_gid() == figure_style.FLAT_GID] == [
        "flat within ±0.01 (the standard error)"
    ]


@pytest.mark.parametrize("n", [3, 8])
def test_no_axis_range_is_below_the_noise(n):
    records = history(n=n, finetune=True)
    for r in records:  # a curve that wobbles far less than its standard error
        r["noise/gamma=1/delta"] = 0.05 + 1e-5 * (r["step"] % 20)
        r["noise/gamma=1/delta_stderr"] = 0.004
    for fig in figures.render_figures(records).values():
        for ax in fig.axes:
            errors = [
                e
                for line in ax.lines
                if line.get_gid() == figure_style.DATA_GID
                for e in figures.series(records, "noise/gamma=1/delta")[2]
                if line.get_label().startswith("γ=1") and ax.get_title() == "sensitivity δ"
            ]
            low, high = ax.get_ylim()
            assert high - low >= 2 * max(errors, default=0.0)


def test_the_tuned_lr_is_one_level_per_lr_chosen():
    fig = finetune_figure(tuned(history(finetune=True)))
    lr_ax = fig.axes[3]
    assert lr_ax.get_yscale() == "log"
    assert [t.get_text() for t in lr_ax.get_yticklabels()] == ["0.001"]
    low, high = lr_ax.get_ylim()
    assert high / low >= 9  # no 0.00096-0.00104 axis around a constant


def test_no_text_says_inf():
    records = not_crossed(with_forecast(history(marks=True), 6e6, 5.8e6, math.inf))
    far = not_crossed(with_forecast(history(marks=True), 1e9, 5e7, math.inf))
    beyond = not_crossed(with_forecast(history(marks=True), 2e7, 3e6, None))
    for each in (records, far, beyond):
        for fig in figures.render_figures(each).values():
            for text in all_texts(fig):
                assert "inf" not in text.lower() and "∞" not in text, text


def test_every_legend_entry_has_a_visible_mark_on_the_panel():
    records = not_crossed(with_forecast(history(marks=True), 6e6, 5.8e6, None))
    records[-1][keys.inflection_key(PERTURBED, "rise")] = 0.5
    records[-1][keys.inflection_key(PERTURBED, "rise_threshold")] = 0.1
    rendered = figures.render_figures(records)
    rendered["finetune"] = finetune_figure(tuned(history(finetune=True)))
    for fig in rendered.values():
        for ax in fig.axes:
            if ax.get_legend() is None:
                continue
            labels = {line.get_label() for line in ax.lines if line.get_visible()}
            for text in legend_texts(ax):
                if text in labels:
                    continue  # a curve or an edge arrow, drawn under this label
                # A key of a mark: a ring, T* line, interval or error band of that kind.
                kind = {v: k for k, v in figure_style.MARK_LABELS.items() if v}[text]
                if kind.startswith("bottom:"):
                    state = figure_style._FILL[kind[7:]]
                    fills = [line.get_fillstyle() for line in rings(ax)]
                    faces = [line.get_markerfacecolor() for line in rings(ax)]
                    assert ("none" in faces) if state == "none" else (state in fills), kind
                elif kind == "forecast":
                    assert vertical_lines(ax), kind
                elif kind == "interval":
                    assert spans(ax), kind
                else:
                    assert ax.collections, kind  # the shaded standard-error bands


def test_declared_signals_decide_what_is_drawn_not_the_key_names():
    records = history(finetune=True)
    declared = [keys.reference_signal(), *keys.noise_signals([1.0])]
    rendered = figures.render_figures(records, declared)
    assert set(rendered) == {"noise"}  # the fine-tune keys were not declared: not drawn
    assert [line.get_label() for line in rendered["noise"].axes[0].lines] == ["reference", "γ=1"]
    # A history saved without declarations (an older run) still draws its built-in keys.
    assert set(figures.render_figures(records)) == {"noise", "finetune"}
