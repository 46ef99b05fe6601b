"""The Grafana dashboards outside Grafana: their PromQL run against a real Prometheus, and their panels
drawn with matplotlib from what it answers (the README screenshots come from here, from real runs)."""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no screen: draw into files
import matplotlib.dates as mdates
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

GRAFANA = Path(__file__).resolve().parents[2] / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
INSTANT_PANELS = {"stat", "bargauge", "table", "gauge"}


def load(path: Path) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(path.read_text())
    return board


def expand(text: str, variables: dict[str, str]) -> str:
    """Grafana's variable substitution, for the variables our dashboards use (longest name first)."""
    for name in sorted(variables, key=len, reverse=True):
        text = text.replace(f"${name}", variables[name])
    return text


@dataclass(frozen=True)
class Prometheus:
    url: str

    def _get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    def instant(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._get("/api/v1/query", query=expr)["result"]
        return result

    def range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._get("/api/v1/query_range", query=expr, start=f"{start:.3f}",
                                                 end=f"{end:.3f}", step=f"{step:g}")["result"]
        return result

    def label_values(self, label: str, match: str) -> list[str]:
        values: list[str] = self._get(f"/api/v1/label/{label}/values", **{"match[]": match})
        return values

    def query_errors(self, expr: str) -> str | None:
        """The parse error Prometheus reports for `expr`, or None."""
        try:
            self.instant(expr)
        except urllib.error.HTTPError as exc:
            return str(json.loads(exc.read()).get("error"))
        return None


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template) or json.dumps(labels)


def panel_queries(panel: dict[str, Any], variables: dict[str, str]) -> list[tuple[str, str]]:
    """(expanded PromQL, legend template) of each target."""
    return [(expand(t["expr"], variables), t.get("legendFormat", "")) for t in panel.get("targets", [])]


def variable_queries(board: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(variable, label, metric) of each `label_values(metric, label)` template variable."""
    out = []
    for var in board.get("templating", {}).get("list", []):
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
        assert match, f"{var['name']}: only label_values(metric, label) is supported here"
        out.append((var["name"], match.group(2), match.group(1)))
    return out


# --- drawing ---------------------------------------------------------------------------------------------

BACKGROUND, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0", "#37872d",
           "#fade2a", "#96d98d", "#ffb357"]
NAMED = {"green": "#73bf69", "yellow": "#fade2a", "orange": "#ff9830", "red": "#f2495c", "blue": "#5794f2"}


def _unit_formatter(unit: str) -> FuncFormatter:
    if unit == "percentunit":
        return FuncFormatter(lambda v, _: f"{v * 100:.0f}%")
    if unit == "s":
        return FuncFormatter(lambda v, _: f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s")
    return FuncFormatter(lambda v, _: f"{v:,.3g}")


def _show(value: float, unit: str, decimals: int | None) -> str:
    if unit == "percentunit":
        return f"{value * 100:.{decimals if decimals is not None else 1}f}%"
    return f"{value:,.{decimals if decimals is not None else 2}f}"


def render(board: dict[str, Any], prometheus: Prometheus, start: float, end: float, variables: dict[str, str],
           out: Path) -> int:
    """Draw every panel of `board` from Prometheus into one PNG; returns how many panels had data."""
    panels = board["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(18, rows * 0.42 + 0.8), facecolor=BACKGROUND)
    fig.text(0.01, 1 - 0.35 / (rows * 0.42 + 0.8), board["title"], color=TEXT, fontsize=15, weight="bold",
             va="center")
    top = 1 - 0.8 / (rows * 0.42 + 0.8)
    step = max((end - start) / 240, 1)
    with_data = 0
    for panel in panels:
        grid = panel["gridPos"]
        box = (grid["x"] / 24 + 0.006, top - (grid["y"] + grid["h"]) / rows * top + 0.012,
               grid["w"] / 24 - 0.012, grid["h"] / rows * top - 0.024)
        frame = fig.add_axes(box, facecolor=PANEL)
        frame.set_xticks([])
        frame.set_yticks([])
        for spine in frame.spines.values():
            spine.set_color(GRID)
        frame.text(0.01, 0.97, expand(panel["title"], variables), transform=frame.transAxes, color=TEXT,
                   fontsize=9.5, va="top", weight="bold")
        defaults = panel["fieldConfig"]["defaults"]
        unit, decimals = defaults.get("unit", "short"), defaults.get("decimals")
        kind = panel["type"]
        indent = {"timeseries": 0.025, "state-timeline": 0.12}.get(kind, 0)  # room for the y labels
        inner = (box[0] + 0.03 * box[2] + indent, box[1] + 0.1 * box[3], box[2] * 0.94 - indent, box[3] * 0.72)
        if kind in INSTANT_PANELS:
            results = [(legend(tpl, r["metric"]), float(r["value"][1]))
                       for expr, tpl in panel_queries(panel, variables) for r in prometheus.instant(expr)]
            with_data += bool(results)
            if kind == "stat":
                text = "  ".join(name if panel["options"].get("textMode") == "name" else _show(v, unit, decimals)
                                 for name, v in results[:3]) or "No data"
                colour = _stat_colour(defaults, results[0][1] if results else 0.0)
                frame.text(0.5, 0.4, text, transform=frame.transAxes, color=colour, ha="center", va="center",
                           fontsize=22 if len(text) < 14 else 12, weight="bold")
            else:
                ax = fig.add_axes((inner[0] + inner[2] * 0.25, inner[1], inner[2] * 0.7, inner[3]), facecolor=PANEL)
                results.sort(key=lambda item: item[1])
                ax.barh([n for n, _ in results], [v for _, v in results],
                        color=[PALETTE[i % len(PALETTE)] for i in range(len(results))])
                for i, (_, v) in enumerate(results):
                    ax.text(v, i, " " + _show(v, unit, decimals), color=TEXT, va="center", fontsize=8)
                _style(ax)
                ax.tick_params(axis="y", labelsize=8)
            continue
        ax = fig.add_axes(inner, facecolor=PANEL)
        _style(ax)
        series = [(legend(tpl, r["metric"]), r["values"])
                  for expr, tpl in panel_queries(panel, variables) for r in prometheus.range(expr, start, end, step)]
        with_data += bool(series)
        if kind == "state-timeline":
            states = {int(k): NAMED.get(v["color"], v["color"]) for k, v in
                      defaults["mappings"][0]["options"].items()}
            for row, (_, values) in enumerate(series):
                times = [datetime.fromtimestamp(float(t), UTC) for t, _ in values]
                for (t0, (_, v)), t1 in zip(zip(times, values, strict=True), [*times[1:], times[-1]], strict=True):
                    left = mdates.date2num(t0)  # type: ignore[no-untyped-call]  # matplotlib.dates: no annotations
                    ax.barh(row, (t1 - t0).total_seconds() / 86400 or step / 86400, left=left,
                            color=states.get(int(float(v)), GRID), height=0.7)
            ax.set_yticks(range(len(series)), [name for name, _ in series], fontsize=8)
            ax.xaxis_date()
        else:
            dashed = _dashed_series(panel)
            colours: dict[str, str] = {}
            for name, values in series:
                # a dashed series ("X threshold") takes the colour of the series it belongs to ("X")
                base = re.sub(dashed, "", name) if dashed and re.search(dashed, name) else name
                colour = colours.setdefault(base, PALETTE[len(colours) % len(PALETTE)])
                # matplotlib's stubs take floats only, but its date converter takes the datetimes
                ax.plot([datetime.fromtimestamp(float(t), UTC) for t, _ in values],  # type: ignore[arg-type]
                        [float(v) for _, v in values],
                        color=colour, linewidth=1 if base != name else 1.6, linestyle="--" if base != name else "-",
                        label=name)
            for stepdef in defaults.get("thresholds", {}).get("steps", [])[1:]:
                if defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode") == "line":
                    ax.axhline(stepdef["value"], color=NAMED.get(stepdef["color"], stepdef["color"]),
                               linestyle="--", linewidth=1)
            ax.yaxis.set_major_formatter(_unit_formatter(unit))
            if series:
                ax.legend(loc="upper left", fontsize=7, ncol=3 if len(series) > 6 else 1, framealpha=0.6,
                          facecolor=PANEL, edgecolor=GRID, labelcolor=TEXT)
        # matplotlib.dates ships no annotations; set_xlim's stub takes floats only, its date converter datetimes
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))  # type: ignore[no-untyped-call]
        ax.set_xlim(datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC))  # type: ignore[arg-type]
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor=BACKGROUND)
    plt.close(fig)
    return with_data


def _dashed_series(panel: dict[str, Any]) -> str | None:
    """The regexp of the series a panel override draws dashed (Grafana's custom.lineStyle), if any."""
    for override in panel["fieldConfig"].get("overrides", []):
        if override["matcher"]["id"] == "byRegexp" and any(
                p["id"] == "custom.lineStyle" for p in override["properties"]):
            return str(override["matcher"]["options"]).removeprefix(".*")
    return None


def _style(ax: Any) -> None:
    ax.tick_params(colors=TEXT, labelsize=7)
    ax.grid(color=GRID, linewidth=0.6)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _stat_colour(defaults: dict[str, Any], value: float) -> str:
    colour = PALETTE[2]
    steps = defaults.get("thresholds", {}).get("steps", [])
    if len(steps) > 1:
        for stepdef in steps:
            if stepdef["value"] is None or value >= stepdef["value"]:
                colour = NAMED.get(stepdef["color"], stepdef["color"])
    return colour
