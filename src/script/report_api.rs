//! Script bindings for charts and run records: `plot_bars`, `plot_radar`, `plot_curves`,
//! `plot_hist`, the Plot methods, `run_dir` and `note`.

use std::path::Path;
use std::sync::Arc;

use polars::prelude::DataFrame;
use rhai::plugin::*;
use rhai::{Array, Map};

use super::convert::{check_keys, error, strings, text, to_json, RhaiResult};
use super::{Area, Output};
use crate::report::{
    self, BarOptions, CurveLayout, CurveOptions, Frame, Group, HistOptions, Plot, RadarOptions,
    RunRecord,
};

/// The reports area of the reference.
pub const AREA: Area = Area {
    title: "Plots and run records",
    intro: "Charts of tables, drawn as PNG and SVG with embedded fonts (Chinese labels \
            included): `display(plot)` shows one (in Jupyter as a picture; under `rlvr run` it \
            is saved into the run folder), `plot.save(\"x.png\")` or `plot.save(\"x.svg\")` \
            writes one. Every chart takes an optional map of options; all take `title` (\"\" \
            for none), `width` and `height` in pixels, and axis charts `x_label` and \
            `y_label`. Under `rlvr run`, `run_dir()` is the run's folder, whose \
            `manifest.json` records the run.",
    register,
};

fn register(engine: &mut Engine, _output: &Arc<dyn Output>) {
    engine.register_type_with_name::<Plot>("Plot");
    engine.register_global_module(exported_module!(report_functions).into());
}

const FRAME: [&str; 5] = ["title", "x_label", "y_label", "width", "height"];

fn keys(extra: &[&'static str], frame: &[&'static str]) -> Vec<&'static str> {
    frame.iter().chain(extra).copied().collect()
}

fn frame(opts: &Map) -> RhaiResult<Frame> {
    Ok(Frame {
        title: text(opts, "title")?,
        x_label: text(opts, "x_label")?,
        y_label: text(opts, "y_label")?,
        width: pixels(opts, "width")?,
        height: pixels(opts, "height")?,
    })
}

fn pixels(opts: &Map, key: &str) -> RhaiResult<Option<u32>> {
    match opts.get(key) {
        None => Ok(None),
        Some(v) => match v.as_int() {
            Ok(n) if (100..=20_000).contains(&n) => Ok(Some(n as u32)),
            _ => Err(error(format!(
                "option `{key}` must be a whole number of pixels from 100 to 20000, not {v}"
            ))),
        },
    }
}

fn flag(opts: &Map, key: &str, default: bool) -> RhaiResult<bool> {
    match opts.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_bool()
            .map_err(|t| error(format!("option `{key}` must be true or false, not {t}"))),
    }
}

fn float(v: &Dynamic) -> Option<f64> {
    v.as_float()
        .ok()
        .or_else(|| v.as_int().ok().map(|i| i as f64))
}

fn number(opts: &Map, key: &str) -> RhaiResult<Option<f64>> {
    match opts.get(key) {
        None => Ok(None),
        Some(v) => float(v).map(Some).ok_or_else(|| {
            error(format!(
                "option `{key}` must be a number, not {}",
                v.type_name()
            ))
        }),
    }
}

fn whole(opts: &Map, key: &str) -> RhaiResult<Option<usize>> {
    match opts.get(key) {
        None => Ok(None),
        Some(v) => match v.as_int() {
            Ok(n) if n >= 0 => Ok(Some(n as usize)),
            _ => Err(error(format!(
                "option `{key}` must be a whole number, not {v}"
            ))),
        },
    }
}

fn pair(opts: &Map, key: &str) -> RhaiResult<Option<(f64, f64)>> {
    let Some(v) = opts.get(key) else {
        return Ok(None);
    };
    let items = v.clone().try_cast::<Array>().unwrap_or_default();
    match items.as_slice() {
        [a, b] => match (float(a), float(b)) {
            (Some(a), Some(b)) => Ok(Some((a, b))),
            _ => Err(error(format!(
                "option `{key}` must hold two numbers, e.g. [0, 1]"
            ))),
        },
        _ => Err(error(format!(
            "option `{key}` must be two numbers, e.g. [0, 1]"
        ))),
    }
}

fn group(opts: &Map) -> RhaiResult<Group> {
    match opts.get("group") {
        None => Ok(Group::Auto),
        Some(v) if v.is_unit() || v.as_bool() == Ok(false) => Ok(Group::Off),
        Some(v) => v.clone().into_string().map(Group::Column).map_err(|t| {
            error(format!(
                "option `group` must be a column name, () or false, not {t}"
            ))
        }),
    }
}

fn bar_options(opts: &Map) -> RhaiResult<BarOptions> {
    let allowed = keys(
        &[
            "group",
            "ci_low",
            "ci_high",
            "whiskers",
            "horizontal",
            "values",
            "digits",
            "range",
        ],
        &FRAME,
    );
    check_keys(opts, &allowed, "plot_bars")?;
    let interval = match (text(opts, "ci_low")?, text(opts, "ci_high")?) {
        (Some(low), Some(high)) => Some((low, high)),
        (None, None) => None,
        _ => {
            return Err(error(
                "plot_bars: give both `ci_low` and `ci_high`, or neither",
            ))
        }
    };
    Ok(BarOptions {
        frame: frame(opts)?,
        group: group(opts)?,
        interval,
        whiskers: flag(opts, "whiskers", true)?,
        horizontal: opts
            .get("horizontal")
            .map(|_| flag(opts, "horizontal", false))
            .transpose()?,
        values: flag(opts, "values", true)?,
        digits: whole(opts, "digits")?,
        range: pair(opts, "range")?,
    })
}

fn radar_options(opts: &Map) -> RhaiResult<RadarOptions> {
    check_keys(
        opts,
        &keys(&["group", "range", "fill"], &["title", "width", "height"]),
        "plot_radar",
    )?;
    Ok(RadarOptions {
        frame: frame(opts)?,
        group: group(opts)?,
        range: pair(opts, "range")?,
        fill: flag(opts, "fill", true)?,
    })
}

fn curve_options(opts: &Map) -> RhaiResult<CurveOptions> {
    check_keys(
        opts,
        &keys(
            &["x", "smooth", "layout", "group", "per_row", "band"],
            &FRAME,
        ),
        "plot_curves",
    )?;
    let layout = match text(opts, "layout")?.as_deref() {
        None | Some("panels") => CurveLayout::Panels,
        Some("shared") => CurveLayout::Shared,
        Some(other) => {
            return Err(error(format!(
                "option `layout` must be \"panels\" or \"shared\", not \"{other}\""
            )))
        }
    };
    Ok(CurveOptions {
        frame: frame(opts)?,
        x: text(opts, "x")?.unwrap_or_else(|| "step".to_string()),
        smooth: number(opts, "smooth")?.unwrap_or(0.0),
        layout,
        group: group(opts)?,
        panels_per_row: whole(opts, "per_row")?,
        band: text(opts, "band")?,
    })
}

fn hist_options(opts: &Map) -> RhaiResult<HistOptions> {
    check_keys(
        opts,
        &keys(&["bins", "range", "group", "counts"], &FRAME),
        "plot_hist",
    )?;
    Ok(HistOptions {
        frame: frame(opts)?,
        bins: whole(opts, "bins")?.unwrap_or(10),
        range: pair(opts, "range")?,
        group: group(opts)?,
        counts: flag(opts, "counts", true)?,
    })
}

fn columns(value: Dynamic) -> RhaiResult<Vec<String>> {
    if value.is_string() {
        return Ok(vec![value.into_string().map_err(error)?]);
    }
    match value.clone().try_cast::<Array>() {
        Some(items) => strings(items, "columns"),
        None => Err(error(format!(
            "columns must be a column name or an array of names, not {}",
            value.type_name()
        ))),
    }
}

#[export_module]
mod report_functions {
    use super::*;

    /// Grouped bars of `y` per value of `x`, e.g. `plot_bars(summary, "category",
    /// "accuracy")`: one colour per value of the `model` column when the table has one,
    /// whiskers from `ci_low`/`ci_high` when it has both, each bar's value written on it.
    #[rhai_fn(name = "plot_bars", return_raw)]
    pub fn plot_bars(table: DataFrame, x: &str, y: &str) -> RhaiResult<Plot> {
        report::bars(&table, x, y, &BarOptions::default()).map_err(error)
    }

    /// Grouped bars with options: `group` (the column of the colours; `()` for none),
    /// `ci_low` and `ci_high` (interval columns), `whiskers` (false: none), `horizontal`
    /// (default: true above 12 categories), `values` (write the values), `digits`, `range`
    /// ([low, high] of the value axis), `title`, `x_label` (categories' axis), `y_label`
    /// (values' axis), `width`, `height`.
    #[rhai_fn(name = "plot_bars", return_raw)]
    pub fn plot_bars_with(table: DataFrame, x: &str, y: &str, options: Map) -> RhaiResult<Plot> {
        report::bars(&table, x, y, &bar_options(&options)?).map_err(error)
    }

    /// A radar chart of `value` per `category` (one spoke each), one polygon per value of
    /// the `model` column when the table has one; the rim is 1 when every value lies in
    /// [0, 1].
    #[rhai_fn(name = "plot_radar", return_raw)]
    pub fn plot_radar(table: DataFrame, category: &str, value: &str) -> RhaiResult<Plot> {
        report::radar(&table, category, value, &RadarOptions::default()).map_err(error)
    }

    /// A radar chart with options: `group` (the polygons' column; `()` for one polygon),
    /// `range` ([centre, rim]), `fill` (false: outlines only), `title`, `width`, `height`.
    #[rhai_fn(name = "plot_radar", return_raw)]
    pub fn plot_radar_with(
        table: DataFrame,
        category: &str,
        value: &str,
        options: Map,
    ) -> RhaiResult<Plot> {
        report::radar(&table, category, value, &radar_options(&options)?).map_err(error)
    }

    /// Training curves: each of `columns` (a name or an array of names, e.g. `["loss",
    /// "reward", "kl"]`) over `step`, one panel per column.
    #[rhai_fn(name = "plot_curves", return_raw)]
    pub fn plot_curves(table: DataFrame, columns: Dynamic) -> RhaiResult<Plot> {
        report::curves(&table, &super::columns(columns)?, &CurveOptions::default()).map_err(error)
    }

    /// Training curves with options: `smooth` (exponential smoothing weight in [0, 1), as
    /// TensorBoard's; the raw values stay as a faint line), `layout` (`"panels"` or
    /// `"shared"`: one pair of axes), `x` (default `step`), `group` (a column of run names:
    /// one line each), `band` (a column of run names within a group, e.g. `"seed"`: each
    /// group's runs drawn as their mean with a shaded band of ± one standard deviation),
    /// `per_row` (panels per row), `title`, `x_label`, `y_label`, `width`, `height`.
    #[rhai_fn(name = "plot_curves", return_raw)]
    pub fn plot_curves_with(table: DataFrame, columns: Dynamic, options: Map) -> RhaiResult<Plot> {
        report::curves(&table, &super::columns(columns)?, &curve_options(&options)?).map_err(error)
    }

    /// A histogram of `column` in 10 bins, over [0, 1] when every value lies there (pass
    /// rates), each bin's count written above it.
    #[rhai_fn(name = "plot_hist", return_raw)]
    pub fn plot_hist(table: DataFrame, column: &str) -> RhaiResult<Plot> {
        report::hist(&table, column, &HistOptions::default()).map_err(error)
    }

    /// A histogram with options: `bins`, `range` ([low, high]), `group` (a column whose
    /// groups get side-by-side bars), `counts` (false: no numbers), `title`, `x_label`,
    /// `y_label`, `width`, `height`.
    #[rhai_fn(name = "plot_hist", return_raw)]
    pub fn plot_hist_with(table: DataFrame, column: &str, options: Map) -> RhaiResult<Plot> {
        report::hist(&table, column, &hist_options(&options)?).map_err(error)
    }

    /// Writes the chart to `path`: SVG when it ends in `.svg`, else PNG. Folders are
    /// created. Under `rlvr run` the file is listed in the run's manifest.
    #[rhai_fn(name = "save", pure, return_raw)]
    pub fn save_plot(plot: &mut Plot, path: &str) -> RhaiResult<()> {
        plot.save(Path::new(path))
            .map_err(|e| error(format!("{path}: {e}")))?;
        RunRecord::note_file(Path::new(path));
        Ok(())
    }

    /// The chart's size in pixels, as text.
    #[rhai_fn(global, name = "to_string", pure)]
    pub fn plot_to_string(plot: &mut Plot) -> String {
        super::super::render_text(&Dynamic::from(plot.clone()))
    }

    /// The chart's size in pixels, as text, for `debug`.
    #[rhai_fn(global, name = "to_debug", pure)]
    pub fn plot_to_debug(plot: &mut Plot) -> String {
        super::super::render_text(&Dynamic::from(plot.clone()))
    }

    /// The folder of the current run (`runs/<script>-<YYYYmmdd-HHMMSS>`, or the folder given
    /// with `rlvr run --out`); outside `rlvr run` (REPL, notebook) the current directory
    /// `"."`. Save outputs here to have them listed with their hashes in `manifest.json`:
    /// `table.save(run_dir() + "/results.parquet")`.
    pub fn run_dir() -> String {
        RunRecord::active()
            .map(|r| r.dir().display().to_string())
            .unwrap_or_else(|| ".".to_string())
    }

    /// Records `key: value` in the run's `manifest.json` under `notes` (a number, text,
    /// array or map), e.g. `note("accuracy", 0.73)`; does nothing outside `rlvr run`.
    pub fn note(key: &str, value: Dynamic) {
        RunRecord::note(key, to_json(&value));
    }
}
