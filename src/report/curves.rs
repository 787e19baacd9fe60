//! Training curves: columns of a Metrics table (one row per step) over `step`, raw and
//! exponentially smoothed; several runs of a group (seeds) as their mean with a ±sd band.

use plotters::coord::Shift;
use plotters::prelude::*;

use super::canvas::{self, Chart, Drawn, Figure};
use super::style::{self, AXIS, GRID, INK, LABEL_SIZE, MARGIN, MUTED, TICK_SIZE};
use super::{input, Frame, Group, Plot, PlotError};

/// How the columns of [`curves`] share the canvas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CurveLayout {
    /// One small chart per column, each with its own value axis.
    #[default]
    Panels,
    /// Every column on one pair of axes, told apart by colour.
    Shared,
}

/// How [`curves`] draws a table.
#[derive(Debug, Clone, PartialEq)]
pub struct CurveOptions {
    /// Title, axis descriptions (`y_label` applies to the shared layout) and size.
    pub frame: Frame,
    /// The column along the horizontal axis.
    pub x: String,
    /// Exponential smoothing weight in `[0, 1)`, as TensorBoard's slider (0.6 is its
    /// default): 0 draws the raw values only; above 0 draws the raw values faintly and the
    /// smoothed line over them.
    pub smooth: f64,
    /// Panels or one shared chart.
    pub layout: CurveLayout,
    /// A column that splits the rows into runs (one line and colour each), e.g. after
    /// concatenating the metrics of several runs; none by default.
    pub group: Group,
    /// Panels per row; by default 1, 2 or 3 from the number of columns.
    pub panels_per_row: Option<usize>,
    /// A column that tells apart runs of one group, e.g. `seed`: each group is drawn as the
    /// mean of its runs at every step with a shaded band of ± one standard deviation
    /// between them (runs smoothed first when `smooth` is above 0); none by default.
    pub band: Option<String>,
}

impl Default for CurveOptions {
    fn default() -> Self {
        CurveOptions {
            frame: Frame::default(),
            x: "step".to_string(),
            smooth: 0.0,
            layout: CurveLayout::Panels,
            group: Group::Auto,
            panels_per_row: None,
            band: None,
        }
    }
}

/// Line charts of `columns` over the `x` column (default `step`), e.g. `loss`, `reward`,
/// `kl` of a GRPO Metrics table. Rows are sorted by `x`; nulls and NaN are skipped.
pub fn curves(
    df: &polars::prelude::DataFrame,
    columns: &[String],
    opts: &CurveOptions,
) -> Result<Plot, PlotError> {
    input::not_empty(df)?;
    check_options(columns, opts)?;
    let xs = input::numbers(df, &opts.x)?;
    let group_column = opts.group.resolve(df, None);
    let group_of = match &group_column {
        Some(name) => input::labels(df, name)?,
        None => vec![String::new(); df.height()],
    };
    let groups = input::distinct(&group_of);
    let run_of = match &opts.band {
        Some(name) => input::labels(df, name)?,
        None => vec![String::new(); df.height()],
    };
    let mut runs_per_group = vec![0; groups.len()];
    let mut series = Vec::new();
    for (c, column) in columns.iter().enumerate() {
        let ys = input::numbers(df, column)?;
        if ys.iter().all(Option::is_none) {
            return Err(PlotError::NoValues {
                column: column.clone(),
            });
        }
        for (g, group) in groups.iter().enumerate() {
            let rows: Vec<usize> = (0..df.height())
                .filter(|&row| group_of[row] == *group)
                .collect();
            let runs =
                input::distinct(&rows.iter().map(|&r| run_of[r].clone()).collect::<Vec<_>>());
            runs_per_group[g] = runs.len();
            let raw = run_points(&rows, &runs, &run_of, &xs, &ys);
            series.push(Series::of(c, g, raw, opts));
        }
    }
    if series.iter().all(|s| s.points.is_empty()) {
        return Err(PlotError::NoValues {
            column: opts.x.clone(),
        });
    }
    let panels = match opts.layout {
        CurveLayout::Panels => columns.len(),
        CurveLayout::Shared => 1,
    };
    let per_row = opts
        .panels_per_row
        .unwrap_or(match panels {
            1 => 1,
            2..=4 => 2,
            _ => 3,
        })
        .clamp(1, panels);
    let rows = panels.div_ceil(per_row);
    let legend = legend(
        columns,
        &groups,
        &runs_per_group,
        group_column.is_some(),
        opts,
    );
    let chart = CurveChart {
        title: opts.frame.title.clone().or_else(|| match opts.layout {
            CurveLayout::Panels if columns.len() > 1 => Some("training curves".to_string()),
            _ => Some(format!("{} over {}", columns.join(", "), opts.x)),
        }),
        x_label: opts.frame.x_label.clone().unwrap_or_else(|| opts.x.clone()),
        y_label: opts.frame.y_label.clone().unwrap_or_else(|| match columns {
            [one] => one.clone(),
            _ => "value".to_string(),
        }),
        size: (
            opts.frame
                .width
                .unwrap_or(if per_row >= 3 { 1200 } else { style::WIDTH }),
            opts.frame.height.unwrap_or(if panels == 1 {
                540
            } else {
                110 + rows as u32 * 320
            }),
        ),
        columns: columns.to_vec(),
        grouped: group_column.is_some() || opts.band.is_some(),
        groups: groups.len(),
        layout: opts.layout,
        per_row,
        rows,
        legend,
        series,
    };
    canvas::render(&chart)
}

/// An error when the options cannot draw: no column, or a smoothing weight outside [0, 1).
fn check_options(columns: &[String], opts: &CurveOptions) -> Result<(), PlotError> {
    if columns.is_empty() {
        return Err(PlotError::Option {
            option: "columns".into(),
            message: "name at least one column to plot".into(),
        });
    }
    if !(0.0..1.0).contains(&opts.smooth) {
        return Err(PlotError::Option {
            option: "smooth".into(),
            message: format!(
                "the smoothing weight must be in [0, 1), not {}",
                opts.smooth
            ),
        });
    }
    Ok(())
}

/// Each run's (x, y) points among `rows`, sorted by x; rows without both values are left
/// out.
fn run_points(
    rows: &[usize],
    runs: &[String],
    run_of: &[String],
    xs: &[Option<f64>],
    ys: &[Option<f64>],
) -> Vec<Vec<(f64, f64)>> {
    runs.iter()
        .map(|run| {
            let mut points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|&&row| run_of[row] == *run)
                .filter_map(|&row| Some((xs[row]?, ys[row]?)))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            points
        })
        .collect()
}

/// The legend's entries: groups (with their number of runs under a band) in panels, columns
/// (per group) on a shared panel.
fn legend(
    columns: &[String],
    groups: &[String],
    runs_per_group: &[usize],
    grouped: bool,
    opts: &CurveOptions,
) -> Vec<String> {
    let group_names: Vec<String> = match &opts.band {
        Some(_) => groups
            .iter()
            .zip(runs_per_group)
            .map(|(g, k)| {
                let g = if g.is_empty() { "all" } else { g.as_str() };
                format!("{g} (mean ± sd of {k} runs)")
            })
            .collect(),
        None => groups.to_vec(),
    };
    match (opts.layout, grouped) {
        (CurveLayout::Panels, true) => group_names,
        (CurveLayout::Panels, false) if opts.band.is_some() => group_names,
        (CurveLayout::Panels, false) => Vec::new(),
        (CurveLayout::Shared, false) => columns.to_vec(),
        (CurveLayout::Shared, true) => columns
            .iter()
            .flat_map(|c| group_names.iter().map(move |g| format!("{c} · {g}")))
            .collect(),
    }
}

/// TensorBoard's exponential moving average with its start-up bias removed.
fn smooth(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let mut last = 0.0;
    let mut debias = 1.0;
    points
        .iter()
        .map(|&(x, y)| {
            last = last * weight + (1.0 - weight) * y;
            debias *= weight;
            (x, last / (1.0 - debias))
        })
        .collect()
}

/// A band around a line: `(x, low, high)` at each point.
type Band = Vec<(f64, f64, f64)>;

/// The mean of runs at every `x` any of them has, and the band of ± one sample standard
/// deviation around it (zero width where a single run has the step).
fn mean_band(runs: &[Vec<(f64, f64)>]) -> (Vec<(f64, f64)>, Band) {
    let mut all: Vec<(f64, f64)> = runs.iter().flatten().copied().collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut mean = vec![];
    let mut band = vec![];
    for same_x in all.chunk_by(|a, b| a.0 == b.0) {
        let values: Vec<f64> = same_x.iter().map(|p| p.1).collect();
        let n = values.len() as f64;
        let m = values.iter().sum::<f64>() / n;
        let sd = if values.len() > 1 {
            (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        mean.push((same_x[0].0, m));
        band.push((same_x[0].0, m - sd, m + sd));
    }
    (mean, band)
}

/// One line: a column of one group, with its smoothed line and its band over runs.
struct Series {
    column: usize,
    group: usize,
    points: Vec<(f64, f64)>,
    smoothed: Option<Vec<(f64, f64)>>,
    band: Option<Band>,
}

impl Series {
    /// The line of `column` for `group` from its runs' `raw` points: smoothed when the
    /// options say so, and under a band the runs' mean with a band of one sd.
    fn of(column: usize, group: usize, raw: Vec<Vec<(f64, f64)>>, opts: &CurveOptions) -> Series {
        let smoothed: Option<Vec<Vec<(f64, f64)>>> =
            (opts.smooth > 0.0).then(|| raw.iter().map(|p| smooth(p, opts.smooth)).collect());
        if opts.band.is_some() {
            Series {
                column,
                group,
                points: mean_band(&raw).0,
                band: Some(mean_band(smoothed.as_ref().unwrap_or(&raw)).1),
                smoothed: smoothed.map(|runs| mean_band(&runs).0),
            }
        } else {
            // without a band every row of the group is one run
            Series {
                column,
                group,
                points: raw.into_iter().next().unwrap_or_default(),
                band: None,
                smoothed: smoothed.and_then(|runs| runs.into_iter().next()),
            }
        }
    }
}

struct CurveChart {
    title: Option<String>,
    x_label: String,
    y_label: String,
    size: (u32, u32),
    columns: Vec<String>,
    grouped: bool,
    groups: usize,
    layout: CurveLayout,
    per_row: usize,
    rows: usize,
    legend: Vec<String>,
    series: Vec<Series>,
}

impl CurveChart {
    /// The colour of a series: by group when grouped in panels, by column otherwise.
    fn color_index(&self, s: &Series) -> usize {
        match (self.layout, self.grouped) {
            (CurveLayout::Panels, true) => s.group,
            (CurveLayout::Panels, false) => s.column,
            (CurveLayout::Shared, _) => s.column * self.groups + s.group,
        }
    }

    /// One panel of the series: axes with ticks and descriptions, then bands and lines.
    fn draw_panel<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        caption: Option<&str>,
        y_desc: Option<&str>,
        series: &[&Series],
    ) -> Drawn<DB> {
        let (x0, x1, y0, y1) = panel_range(series);
        let desc_h = style::measure("Ag", &style::font("Ag", LABEL_SIZE)).1 + 8;
        let tick_h = style::measure("0", &style::font("0", TICK_SIZE)).1 + 10;
        let tick_w = [y0, y1, (y0 + y1) / 2.0]
            .iter()
            .map(|v| style::measure(&tick_text(*v, y1 - y0), &style::font("0", TICK_SIZE)).0)
            .max()
            .unwrap_or(30)
            + 12;
        let mut builder = ChartBuilder::on(area);
        builder
            .margin(8)
            .margin_right(16)
            .x_label_area_size(tick_h + desc_h)
            .y_label_area_size(tick_w + if y_desc.is_some() { desc_h } else { 0 });
        if let Some(caption) = caption {
            builder.caption(caption, style::bold(caption, LABEL_SIZE).color(&INK));
        }
        let mut chart = builder.build_cartesian_2d(x0..x1, y0..y1)?;
        let span = y1 - y0;
        // steps are whole numbers: a short run gets a tick per step, none between them
        let whole = series
            .iter()
            .all(|s| s.points.iter().all(|(x, _)| x.fract() == 0.0));
        let x_ticks = if whole {
            ((x1 - x0).round() as usize + 1).clamp(2, 6)
        } else {
            6
        };
        let x_fmt = move |v: &f64| {
            if whole && (v - v.round()).abs() > 1e-9 {
                String::new()
            } else {
                style::tick(*v)
            }
        };
        let y_fmt = move |v: &f64| tick_text(*v, span);
        let mut mesh = chart.configure_mesh();
        mesh.axis_style(AXIS)
            .bold_line_style(GRID)
            .light_line_style(TRANSPARENT)
            .label_style(style::text_style("0", TICK_SIZE, &MUTED))
            .x_labels(x_ticks)
            .y_labels(6)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .x_desc(self.x_label.as_str())
            .axis_desc_style(style::text_style(&self.x_label, LABEL_SIZE, &INK));
        if let Some(desc) = y_desc {
            mesh.y_desc(desc);
        }
        mesh.draw()?;
        // the bands first, so that every line stays on top of them
        self.draw_bands(&mut chart, series)?;
        self.draw_lines(&mut chart, series)
    }

    /// Each series' band, as a translucent polygon in its colour.
    fn draw_bands<DB: DrawingBackend>(
        &self,
        chart: &mut Chart<DB>,
        series: &[&Series],
    ) -> Drawn<DB> {
        for s in series {
            if let Some(band) = &s.band {
                let color = style::color(self.color_index(s));
                let outline: Vec<(f64, f64)> = band
                    .iter()
                    .map(|&(x, _, hi)| (x, hi))
                    .chain(band.iter().rev().map(|&(x, lo, _)| (x, lo)))
                    .collect();
                chart.draw_series(std::iter::once(Polygon::new(
                    outline,
                    color.mix(0.2).filled(),
                )))?;
            }
        }
        Ok(())
    }

    /// Each series' raw line (faint under a smoothed one; a dot for a single point) and its
    /// smoothed line.
    fn draw_lines<DB: DrawingBackend>(
        &self,
        chart: &mut Chart<DB>,
        series: &[&Series],
    ) -> Drawn<DB> {
        for s in series {
            let color = style::color(self.color_index(s));
            let raw_style = match s.smoothed {
                Some(_) => ShapeStyle::from(&color.mix(0.28)).stroke_width(1),
                None => ShapeStyle::from(&color).stroke_width(2),
            };
            if s.points.len() == 1 {
                chart.draw_series(std::iter::once(Circle::new(s.points[0], 3, color.filled())))?;
            }
            chart.draw_series(LineSeries::new(s.points.iter().copied(), raw_style))?;
            if let Some(smoothed) = &s.smoothed {
                chart.draw_series(LineSeries::new(
                    smoothed.iter().copied(),
                    ShapeStyle::from(&color).stroke_width(2),
                ))?;
            }
        }
        Ok(())
    }
}

/// The axes' ranges (x0, x1, y0, y1) of a panel: every point and band end, with some room
/// above and below the values; a unit range when there is nothing to draw.
fn panel_range(series: &[&Series]) -> (f64, f64, f64, f64) {
    let bands = series
        .iter()
        .flat_map(|s| s.band.iter().flatten())
        .flat_map(|&(x, lo, hi)| [(x, lo), (x, hi)]);
    let all = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .chain(bands);
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for (x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        (x0, x1) = (x0 - 1.0, x1 + 1.0);
    }
    let pad = if y1 - y0 < 1e-12 {
        y0.abs().max(1.0) * 0.1
    } else {
        (y1 - y0) * 0.06
    };
    (x0, x1, y0 - pad, y1 + pad)
}

/// A value-axis tick with as many decimals as the axis span needs; scientific notation for
/// very small spans or very large values.
fn tick_text(v: f64, span: f64) -> String {
    if v.abs() < span * 1e-9 {
        return "0".to_string();
    }
    if span < 1e-4 || v.abs() >= 1e6 {
        return format!("{v:.2e}");
    }
    let digits = ((-span.log10()).ceil() as i32 + 1).clamp(0, 6);
    let scale = 10f64.powi(digits);
    style::tick((v * scale).round() / scale)
}

impl Figure for CurveChart {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Drawn<DB> {
        let mut top = canvas::title(root, self.title.as_deref())?;
        let colors: Vec<RGBColor> = (0..self.legend.len()).map(style::color).collect();
        top += canvas::legend(root, &self.legend, &colors, top, self.grouped)?;
        let body = root.margin(top, MARGIN, MARGIN, MARGIN);
        match self.layout {
            CurveLayout::Shared => {
                let all: Vec<&Series> = self.series.iter().collect();
                self.draw_panel(&body, None, Some(&self.y_label), &all)
            }
            CurveLayout::Panels => {
                let cells = body.split_evenly((self.rows, self.per_row));
                for (c, column) in self.columns.iter().enumerate() {
                    let mine: Vec<&Series> = self.series.iter().filter(|s| s.column == c).collect();
                    self.draw_panel(&cells[c], Some(column), None, &mine)?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_show_the_digits_the_span_needs() {
        assert_eq!(tick_text(0.005, 0.02), "0.005");
        assert_eq!(tick_text(1.7e-18, 0.02), "0");
        assert_eq!(tick_text(150.0, 60.0), "150");
        assert_eq!(tick_text(0.25, 0.6), "0.25");
        assert_eq!(tick_text(2e-6, 5e-6), "2.00e-6");
    }

    #[test]
    fn smoothing_starts_at_the_first_value_and_follows_the_trend() {
        let points: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, 10.0)).collect();
        for (_, y) in smooth(&points, 0.6) {
            assert!(
                (y - 10.0).abs() < 1e-9,
                "debiased EMA of a constant is the constant"
            );
        }
        let ramp: Vec<(f64, f64)> = vec![(0.0, 0.0), (1.0, 1.0)];
        let s = smooth(&ramp, 0.5);
        // last = 0.5 * 0 + 0.5 * 1 = 0.5 after two steps, debiased by 1 - 0.25.
        assert!((s[1].1 - 0.5 / 0.75).abs() < 1e-12);
    }

    #[test]
    fn runs_become_a_mean_with_a_band_of_one_sd() {
        // two runs share steps 1 and 2; only the first has step 3
        let runs = vec![
            vec![(1.0, 1.0), (2.0, 2.0), (3.0, 5.0)],
            vec![(1.0, 3.0), (2.0, 2.0)],
        ];
        let (mean, band) = mean_band(&runs);
        assert_eq!(mean, [(1.0, 2.0), (2.0, 2.0), (3.0, 5.0)]);
        // step 1: values 1 and 3, sample sd √2
        let sd = 2f64.sqrt();
        assert_eq!(band[0], (1.0, 2.0 - sd, 2.0 + sd));
        assert_eq!(band[1], (2.0, 2.0, 2.0));
        assert_eq!(band[2], (3.0, 5.0, 5.0));
    }
}
