//! Grouped bar charts: one bar per category and group (e.g. accuracy per category and
//! model), whiskers from interval columns, values written on the bars.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};

use super::canvas::{self, anchor, Chart, Drawn, Figure};
use super::style::{self, AXIS, GRID, INK, LABEL_SIZE, MARGIN, MUTED, TICK_SIZE, VALUE_SIZE};
use super::{input, Frame, Group, Plot, PlotError};

/// How [`bars`] draws a table.
#[derive(Debug, Clone, PartialEq)]
pub struct BarOptions {
    /// Title, axis descriptions (`x_label` names the categories' axis, `y_label` the values'
    /// axis, whichever way the bars run) and size.
    pub frame: Frame,
    /// The column whose values make the groups (one colour each); by default `model` when
    /// the table has it.
    pub group: Group,
    /// The columns holding each bar's interval (whisker ends); by default `ci_low` and
    /// `ci_high` when the table has both.
    pub interval: Option<(String, String)>,
    /// Draw whiskers at all (false ignores interval columns).
    pub whiskers: bool,
    /// Bars running left to right, categories down the side; by default when there are more
    /// than 12 categories.
    pub horizontal: Option<bool>,
    /// Write each bar's value beside its end (where the numbers fit).
    pub values: bool,
    /// Decimals of the written values; by default none for whole numbers, else from their
    /// size (3 below 1).
    pub digits: Option<usize>,
    /// The value axis range; by default from 0 (or the lowest value) to the highest value
    /// or interval end, with room for the written values.
    pub range: Option<(f64, f64)>,
}

impl Default for BarOptions {
    fn default() -> Self {
        BarOptions {
            frame: Frame::default(),
            group: Group::Auto,
            interval: None,
            whiskers: true,
            horizontal: None,
            values: true,
            digits: None,
            range: None,
        }
    }
}

/// More categories than this turn the bars horizontal unless told otherwise.
const HORIZONTAL_ABOVE: usize = 12;

/// A grouped bar chart of `y` per value of `x` (and per group), from a summary table such as
/// `category, model, n, accuracy, ci_low, ci_high`. Categories and groups keep the order in
/// which they first appear; a (category, group) pair without a row leaves a gap.
pub fn bars(
    df: &polars::prelude::DataFrame,
    x: &str,
    y: &str,
    opts: &BarOptions,
) -> Result<Plot, PlotError> {
    let chart = BarChart::new(df, x, y, opts)?;
    canvas::render(&chart)
}

struct Bar {
    category: usize,
    group: usize,
    value: f64,
    interval: Option<(f64, f64)>,
}

struct BarChart {
    categories: Vec<String>,
    groups: Vec<String>,
    show_legend: bool,
    bars: Vec<Bar>,
    horizontal: bool,
    range: (f64, f64),
    /// The range was given, so it has no headroom for the written values.
    fixed_range: bool,
    values: bool,
    digits: usize,
    title: Option<String>,
    category_label: String,
    value_label: String,
    size: (u32, u32),
}

impl BarChart {
    fn new(
        df: &polars::prelude::DataFrame,
        x: &str,
        y: &str,
        opts: &BarOptions,
    ) -> Result<Self, PlotError> {
        input::not_empty(df)?;
        let category_of = input::labels(df, x)?;
        let values = input::numbers(df, y)?;
        let group_column = opts.group.resolve(df, Some("model"));
        let group_of = match &group_column {
            Some(name) => input::labels(df, name)?,
            None => vec![String::new(); df.height()],
        };
        let intervals = match (&opts.interval, opts.whiskers) {
            (_, false) => None,
            (Some((low, high)), true) => {
                Some((input::numbers(df, low)?, input::numbers(df, high)?))
            }
            (None, true) if input::has(df, "ci_low") && input::has(df, "ci_high") => Some((
                input::numbers(df, "ci_low")?,
                input::numbers(df, "ci_high")?,
            )),
            (None, true) => None,
        };
        if values.iter().all(Option::is_none) {
            return Err(PlotError::NoValues {
                column: y.to_string(),
            });
        }
        let categories = input::distinct(&category_of);
        let groups = input::distinct(&group_of);
        let mut bars: Vec<Bar> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for row in 0..df.height() {
            let category = categories
                .iter()
                .position(|c| *c == category_of[row])
                .expect("listed");
            let group = groups
                .iter()
                .position(|g| *g == group_of[row])
                .expect("listed");
            if !seen.insert((category, group)) {
                return Err(PlotError::Duplicate {
                    category: category_of[row].clone(),
                    group: group_of[row].clone(),
                });
            }
            let Some(value) = values[row] else { continue };
            let interval = intervals
                .as_ref()
                .and_then(|(low, high)| match (low[row], high[row]) {
                    (Some(l), Some(h)) => Some((l.min(h), l.max(h))),
                    _ => None,
                });
            bars.push(Bar {
                category,
                group,
                value,
                interval,
            });
        }
        let horizontal = opts
            .horizontal
            .unwrap_or(categories.len() > HORIZONTAL_ABOVE);
        let digits = opts
            .digits
            .unwrap_or_else(|| style::default_digits(bars.iter().map(|b| b.value)));
        let range = match opts.range {
            Some((lo, hi)) if lo < hi => (lo, hi),
            Some((lo, hi)) => {
                return Err(PlotError::Option {
                    option: "range".into(),
                    message: format!("the low end {lo} must be below the high end {hi}"),
                })
            }
            None => value_range(&bars, opts.values, horizontal),
        };
        let show_legend = group_column.is_some();
        let size = default_size(&opts.frame, &categories, groups.len(), horizontal);
        Ok(BarChart {
            title: match &opts.frame.title {
                Some(t) => Some(t.clone()),
                None => Some(format!("{y} by {x}")),
            },
            category_label: opts.frame.x_label.clone().unwrap_or_else(|| x.to_string()),
            value_label: opts.frame.y_label.clone().unwrap_or_else(|| y.to_string()),
            categories,
            groups,
            show_legend,
            bars,
            horizontal,
            range,
            fixed_range: opts.range.is_some(),
            values: opts.values,
            digits,
            size,
        })
    }

    /// Where bar `group` of a category starts and ends along the category axis, in
    /// category units (category `i` spans `i .. i + 1`).
    fn slot(&self, category: usize, group: usize) -> (f64, f64) {
        let width = 0.8 / self.groups.len() as f64;
        let start = category as f64 + 0.1 + group as f64 * width;
        (start, start + width)
    }

    /// A point of the chart from a position along the category axis and a value.
    fn point(&self, along: f64, value: f64) -> (f64, f64) {
        if self.horizontal {
            (value, self.categories.len() as f64 - along)
        } else {
            (along, value)
        }
    }
}

/// From 0 (or the lowest value) to the highest value or whisker end, with headroom for the
/// written values.
fn value_range(bars: &[Bar], values: bool, horizontal: bool) -> (f64, f64) {
    let mut lo = 0.0f64;
    let mut hi = 0.0f64;
    for bar in bars {
        let (l, h) = bar.interval.unwrap_or((bar.value, bar.value));
        lo = lo.min(bar.value).min(l);
        hi = hi.max(bar.value).max(h);
    }
    if hi - lo < 1e-12 {
        hi = lo + 1.0;
    }
    let span = hi - lo;
    let headroom = match (values, horizontal) {
        (true, true) => 0.14,
        (true, false) => 0.09,
        (false, _) => 0.03,
    };
    if hi > 0.0 {
        hi += span * headroom;
    }
    if lo < 0.0 {
        lo -= span * headroom;
    }
    (lo, hi)
}

/// Pixels of a vertical bar chart that are not category labels: title, legend, plot,
/// axis description.
const VERTICAL_OVERHEAD: i32 = 440;

/// The canvas: horizontal charts grow a row per category; vertical ones grow wide enough
/// for their bars and tall enough for labels turned upward (up to 1000 pixels).
fn default_size(
    frame: &Frame,
    categories: &[String],
    groups: usize,
    horizontal: bool,
) -> (u32, u32) {
    let n = categories.len();
    let width = frame.width.unwrap_or(if horizontal {
        style::WIDTH
    } else {
        style::WIDTH.max((n * (groups * 16 + 14)) as u32 + 200)
    });
    let height = frame.height.unwrap_or(if horizontal {
        let per_category = (groups * 16 + 14).max(30) as u32;
        (n as u32 * per_category + 230).max(320)
    } else {
        let longest = categories
            .iter()
            .map(|c| style::measure(c, &style::font(c, LABEL_SIZE)).0)
            .max()
            .unwrap_or(0);
        (VERTICAL_OVERHEAD + longest).clamp(style::HEIGHT as i32, 1000) as u32
    });
    (width, height)
}

/// Whether two (left, right, top, bottom) pixel boxes share any pixel.
fn overlaps(a: (i32, i32, i32, i32), b: (i32, i32, i32, i32)) -> bool {
    a.0 < b.1 && b.0 < a.1 && a.2 < b.3 && b.2 < a.3
}

/// How the category labels of vertical bars are laid out under the axis.
enum Labels {
    /// Each label as lines side by side, horizontal.
    Lines(Vec<Vec<String>>),
    /// Each label turned upward, cut to a length.
    Upward(Vec<String>),
}

impl Labels {
    fn height(&self) -> i32 {
        match self {
            Labels::Lines(lines) => {
                let line = line_height();
                lines.iter().map(|l| l.len() as i32).max().unwrap_or(1) * line
            }
            Labels::Upward(labels) => labels
                .iter()
                .map(|l| style::measure(l, &style::font(l, LABEL_SIZE)).0)
                .max()
                .unwrap_or(0),
        }
    }
}

fn line_height() -> i32 {
    style::measure("Ag", &style::font("Ag", LABEL_SIZE)).1 + 4
}

/// Horizontal labels where each fits its slot (wrapped on up to three lines), else upward
/// labels no longer than `max_upward` pixels.
fn vertical_labels(categories: &[String], slot_px: i32, max_upward: i32) -> Labels {
    let room = slot_px - 8;
    let wrapped: Vec<Vec<String>> = categories
        .iter()
        .map(|c| style::wrap(c, &style::font(c, LABEL_SIZE), room, 3))
        .collect();
    let fits = wrapped.iter().all(|lines| {
        lines
            .iter()
            .all(|l| style::measure(l, &style::font(l, LABEL_SIZE)).0 <= room)
            && !lines.iter().any(|l| l.ends_with('…'))
    });
    if fits {
        Labels::Lines(wrapped)
    } else {
        Labels::Upward(
            categories
                .iter()
                .map(|c| style::ellipsize(c, &style::font(c, LABEL_SIZE), max_upward))
                .collect(),
        )
    }
}

/// The widest tick label of a value axis from `lo` to `hi`.
fn tick_width(lo: f64, hi: f64) -> i32 {
    [lo, hi, (lo + hi) / 2.0, hi * 0.95]
        .iter()
        .map(|v| style::tick((v * 1000.0).round() / 1000.0))
        .map(|t| style::measure(&t, &style::font(&t, TICK_SIZE)).0)
        .max()
        .unwrap_or(30)
        + 14
}

/// The category labels as laid out: wrapped beside horizontal bars, or under vertical ones.
enum CategoryLabels {
    /// Each label as up to two lines, right-aligned left of the plot.
    Beside(Vec<Vec<String>>),
    /// Each label under its slot of the category axis.
    Under(Labels),
}

impl BarChart {
    /// The label areas' sizes (left, bottom) and the category labels laid out to fit them:
    /// the category labels are drawn there by [`BarChart::draw_category_labels`], the value
    /// ticks by plotters.
    fn label_areas(&self, desc_height: i32) -> (i32, i32, CategoryLabels) {
        let (width, height) = (self.size.0 as i32, self.size.1 as i32);
        if self.horizontal {
            let tick_h = style::measure("0", &style::font("0", TICK_SIZE)).1 + 12;
            let max_w = (width as f64 * 0.38) as i32;
            let lines: Vec<Vec<String>> = self
                .categories
                .iter()
                .map(|c| style::wrap(c, &style::font(c, LABEL_SIZE), max_w, 2))
                .collect();
            let widest = lines
                .iter()
                .flatten()
                .map(|l| style::measure(l, &style::font(l, LABEL_SIZE)).0)
                .max()
                .unwrap_or(0);
            (
                widest + 14 + desc_height,
                tick_h + desc_height,
                CategoryLabels::Beside(lines),
            )
        } else {
            let left = tick_width(self.range.0, self.range.1) + desc_height;
            let plot_w = width - left - 2 * MARGIN;
            let slot_px = (plot_w as f64 / self.categories.len() as f64) as i32;
            let upward = (height - VERTICAL_OVERHEAD).max(height * 3 / 10);
            let labels = vertical_labels(&self.categories, slot_px, upward);
            let bottom = labels.height() + 12 + desc_height;
            (left, bottom, CategoryLabels::Under(labels))
        }
    }

    /// Room (above, right of) the plot for the values written past the bars' ends: a given
    /// range leaves no headroom inside the plot for them, so they get room outside it.
    fn value_room(&self) -> (i32, i32) {
        if !(self.values && self.fixed_range) {
            return (0, 0);
        }
        let font = style::font("0", VALUE_SIZE);
        if self.horizontal {
            let widest = self
                .bars
                .iter()
                .map(|b| style::measure(&format!("{:.*}", self.digits, b.value), &font).0)
                .max()
                .unwrap_or(0);
            (0, widest + 4)
        } else {
            (style::measure("0", &font).1 + 4, 0)
        }
    }

    /// The chart on `body` with its label areas, value ticks and grid drawn.
    fn axes<'a, DB: DrawingBackend>(
        &self,
        body: &'a DrawingArea<DB, Shift>,
        left: i32,
        bottom: i32,
    ) -> Result<Chart<'a, DB>, DrawingAreaErrorKind<DB::ErrorType>> {
        let n = self.categories.len() as f64;
        let (x_range, y_range) = if self.horizontal {
            (self.range.0..self.range.1, 0.0..n)
        } else {
            (0.0..n, self.range.0..self.range.1)
        };
        let mut chart = ChartBuilder::on(body)
            .x_label_area_size(bottom)
            .y_label_area_size(left)
            .build_cartesian_2d(x_range, y_range)?;
        let fmt = |v: &f64| style::tick(*v);
        let tick_style = style::text_style("0", TICK_SIZE, &MUTED);
        let mut mesh = chart.configure_mesh();
        mesh.axis_style(AXIS)
            .bold_line_style(GRID)
            .light_line_style(TRANSPARENT)
            .label_style(tick_style)
            .x_label_formatter(&fmt)
            .y_label_formatter(&fmt);
        if self.horizontal {
            mesh.disable_y_mesh().y_labels(0).x_labels(8);
        } else {
            mesh.disable_x_mesh().x_labels(0).y_labels(8);
        }
        mesh.draw()?;
        Ok(chart)
    }

    /// Each bar from `base` to its value, in its group's colour.
    fn draw_bars<DB: DrawingBackend>(
        &self,
        chart: &mut Chart<DB>,
        colors: &[RGBColor],
        base: f64,
    ) -> Drawn<DB> {
        for bar in &self.bars {
            let (start, end) = self.slot(bar.category, bar.group);
            chart.draw_series(std::iter::once(Rectangle::new(
                [self.point(start, base), self.point(end, bar.value)],
                colors[bar.group].filled(),
            )))?;
        }
        Ok(())
    }

    /// The thickness of one bar in pixels.
    fn bar_px<DB: DrawingBackend>(&self, chart: &Chart<DB>, base: f64) -> i32 {
        let (s, e) = self.slot(0, 0);
        let a = chart.backend_coord(&self.point(s, base));
        let b = chart.backend_coord(&self.point(e, base));
        (a.0 - b.0).abs().max((a.1 - b.1).abs())
    }

    /// A whisker with caps over each bar that has an interval, thicker on thick bars.
    fn draw_whiskers<DB: DrawingBackend>(&self, chart: &mut Chart<DB>, bar_px: i32) -> Drawn<DB> {
        let whisker = ShapeStyle::from(&INK).stroke_width(if bar_px >= 10 { 2 } else { 1 });
        for bar in &self.bars {
            let Some((low, high)) = bar.interval else {
                continue;
            };
            let (start, end) = self.slot(bar.category, bar.group);
            let mid = (start + end) / 2.0;
            let cap = (end - start) * 0.2;
            for (a, b) in [
                (self.point(mid, low), self.point(mid, high)),
                (self.point(mid - cap, low), self.point(mid + cap, low)),
                (self.point(mid - cap, high), self.point(mid + cap, high)),
            ] {
                chart.draw_series(std::iter::once(PathElement::new(vec![a, b], whisker)))?;
            }
        }
        Ok(())
    }

    /// Each bar's value written past its end (or its whisker's), when the numbers fit the
    /// bars' thickness.
    fn draw_values<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        chart: &Chart<DB>,
        bar_px: i32,
    ) -> Drawn<DB> {
        let texts: Vec<String> = self
            .bars
            .iter()
            .map(|b| format!("{:.*}", self.digits, b.value))
            .collect();
        let value_font = style::font("0", VALUE_SIZE);
        let widest = texts
            .iter()
            .map(|t| style::measure(t, &value_font).0)
            .max()
            .unwrap_or(0);
        let tall = style::measure("0", &value_font).1;
        let fits = if self.horizontal {
            tall <= bar_px + 2
        } else {
            widest <= bar_px + 6
        };
        if !fits {
            return Ok(());
        }
        // Value labels a little wider than their bars would run into their neighbours' where
        // the bars end at the same height: such a label is lifted above the labels it would
        // touch.
        let mut placed: Vec<(i32, i32, i32, i32)> = Vec::new();
        for (bar, text) in self.bars.iter().zip(&texts) {
            let (start, end) = self.slot(bar.category, bar.group);
            let mid = (start + end) / 2.0;
            let (low, high) = bar.interval.unwrap_or((bar.value, bar.value));
            let negative = bar.value < 0.0;
            let tip = if negative {
                bar.value.min(low)
            } else {
                bar.value.max(high)
            };
            let (x, y) = chart.backend_coord(&self.point(mid, tip));
            let (mut at, pos) = match (self.horizontal, negative) {
                (true, false) => ((x + 4, y), anchor(HPos::Left, VPos::Center)),
                (true, true) => ((x - 4, y), anchor(HPos::Right, VPos::Center)),
                (false, false) => ((x, y - 3), anchor(HPos::Center, VPos::Bottom)),
                (false, true) => ((x, y + 3), anchor(HPos::Center, VPos::Top)),
            };
            if !self.horizontal {
                let half = style::measure(text, &value_font).0 / 2 + 1;
                at = lift_clear(&mut placed, at, half, tall, negative);
            }
            canvas::text(root, text, at, VALUE_SIZE, &INK, pos)?;
        }
        Ok(())
    }

    /// The category labels beside or under their slots.
    fn draw_category_labels<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        chart: &Chart<DB>,
        labels: &CategoryLabels,
        base: f64,
    ) -> Drawn<DB> {
        let (px0, _) = chart.backend_coord(&(chart.x_range().start, chart.y_range().end));
        let (_, py1) = chart.backend_coord(&(chart.x_range().end, chart.y_range().start));
        match labels {
            CategoryLabels::Beside(lines) => {
                let line = line_height();
                for (i, label) in lines.iter().enumerate() {
                    let (_, y) = chart.backend_coord(&self.point(i as f64 + 0.5, base));
                    let first = y - (label.len() as i32 * line) / 2 + line / 2;
                    for (k, text) in label.iter().enumerate() {
                        canvas::text(
                            root,
                            text,
                            (px0 - 8, first + k as i32 * line),
                            LABEL_SIZE,
                            &INK,
                            anchor(HPos::Right, VPos::Center),
                        )?;
                    }
                }
            }
            CategoryLabels::Under(Labels::Lines(lines)) => {
                let line = line_height();
                for (i, label) in lines.iter().enumerate() {
                    let (x, _) = chart.backend_coord(&self.point(i as f64 + 0.5, base));
                    for (k, text) in label.iter().enumerate() {
                        canvas::text(
                            root,
                            text,
                            (x, py1 + 8 + k as i32 * line),
                            LABEL_SIZE,
                            &INK,
                            anchor(HPos::Center, VPos::Top),
                        )?;
                    }
                }
            }
            CategoryLabels::Under(Labels::Upward(texts)) => {
                for (i, text) in texts.iter().enumerate() {
                    let (x, _) = chart.backend_coord(&self.point(i as f64 + 0.5, base));
                    canvas::text_upward(
                        root,
                        text,
                        (x, py1 + 8),
                        LABEL_SIZE,
                        &INK,
                        anchor(HPos::Right, VPos::Center),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The axes' descriptions, centred under and left of the plot.
    fn draw_axis_descriptions<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        chart: &Chart<DB>,
    ) -> Drawn<DB> {
        let (px0, py0) = chart.backend_coord(&(chart.x_range().start, chart.y_range().end));
        let (px1, py1) = chart.backend_coord(&(chart.x_range().end, chart.y_range().start));
        let (x_desc, y_desc) = if self.horizontal {
            (&self.value_label, &self.category_label)
        } else {
            (&self.category_label, &self.value_label)
        };
        canvas::text(
            root,
            x_desc,
            ((px0 + px1) / 2, self.size.1 as i32 - MARGIN),
            LABEL_SIZE,
            &INK,
            anchor(HPos::Center, VPos::Bottom),
        )?;
        canvas::text_upward(
            root,
            y_desc,
            (MARGIN, (py0 + py1) / 2),
            LABEL_SIZE,
            &INK,
            anchor(HPos::Center, VPos::Top),
        )
    }
}

/// The anchor `at` of a value label `half` wide and `tall` high (above its anchor, or below
/// it for a `negative` bar), lifted past every label in `placed` it would touch; its box is
/// added to `placed`.
fn lift_clear(
    placed: &mut Vec<(i32, i32, i32, i32)>,
    mut at: (i32, i32),
    half: i32,
    tall: i32,
    negative: bool,
) -> (i32, i32) {
    // (left, right, top, bottom) of the label, lifted while it touches one
    let span = |at: (i32, i32)| match negative {
        false => (at.0 - half, at.0 + half, at.1 - tall, at.1),
        true => (at.0 - half, at.0 + half, at.1, at.1 + tall),
    };
    while let Some(hit) = placed.iter().find(|r| overlaps(**r, span(at))) {
        at.1 = if negative { hit.3 + 1 } else { hit.2 - 1 };
    }
    placed.push(span(at));
    at
}

impl Figure for BarChart {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Drawn<DB> {
        let mut top = canvas::title(root, self.title.as_deref())?;
        let colors: Vec<RGBColor> = (0..self.groups.len()).map(style::color).collect();
        if self.show_legend {
            top += canvas::legend(root, &self.groups, &colors, top, true)?;
        }
        let desc_height = style::measure("Ag", &style::font("Ag", LABEL_SIZE)).1 + 10;
        let (left, bottom, labels) = self.label_areas(desc_height);
        let (value_top, value_right) = self.value_room();
        let body = root.margin(top + value_top, MARGIN, MARGIN, MARGIN + 8 + value_right);
        let mut chart = self.axes(&body, left, bottom)?;
        let base = 0.0f64.clamp(self.range.0, self.range.1);
        self.draw_bars(&mut chart, &colors, base)?;
        let bar_px = self.bar_px(&chart, base);
        self.draw_whiskers(&mut chart, bar_px)?;
        if self.values {
            self.draw_values(root, &chart, bar_px)?;
        }
        self.draw_category_labels(root, &chart, &labels, base)?;
        self.draw_axis_descriptions(root, &chart)
    }
}
