//! Histograms of one numeric column, e.g. the judge's pass rates in [0, 1].

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};

use super::canvas::{self, anchor, Drawn, Figure};
use super::style::{self, AXIS, GRID, INK, LABEL_SIZE, MARGIN, MUTED, TICK_SIZE, VALUE_SIZE};
use super::{input, Frame, Group, Plot, PlotError};

/// How [`hist`] draws a table.
#[derive(Debug, Clone, PartialEq)]
pub struct HistOptions {
    /// Title, axis descriptions and size.
    pub frame: Frame,
    /// The number of equal-width bins.
    pub bins: usize,
    /// The binned range; by default 0 to 1 when every value lies there (rates, shares),
    /// else the smallest to the largest value. Values outside are left out.
    pub range: Option<(f64, f64)>,
    /// A column whose groups get side-by-side bars in each bin; none by default.
    pub group: Group,
    /// Write each bin's count above its bar (where the numbers fit).
    pub counts: bool,
}

impl Default for HistOptions {
    fn default() -> Self {
        HistOptions {
            frame: Frame::default(),
            bins: 10,
            range: None,
            group: Group::Auto,
            counts: true,
        }
    }
}

/// A histogram of `column` in equal-width bins; the last bin includes its upper edge, so a
/// pass rate of 1.0 lands in the top bin.
pub fn hist(
    df: &polars::prelude::DataFrame,
    column: &str,
    opts: &HistOptions,
) -> Result<Plot, PlotError> {
    input::not_empty(df)?;
    let values = input::numbers(df, column)?;
    if opts.bins == 0 {
        return Err(PlotError::Option {
            option: "bins".into(),
            message: "at least one bin is needed".into(),
        });
    }
    let present: Vec<f64> = values.iter().flatten().copied().collect();
    if present.is_empty() {
        return Err(PlotError::NoValues {
            column: column.to_string(),
        });
    }
    let range = match opts.range {
        Some((lo, hi)) if lo < hi => (lo, hi),
        Some((lo, hi)) => {
            return Err(PlotError::Option {
                option: "range".into(),
                message: format!("the low end {lo} must be below the high end {hi}"),
            })
        }
        None => {
            let lo = present.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = present.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if lo >= 0.0 && hi <= 1.0 {
                (0.0, 1.0)
            } else if hi - lo < 1e-12 {
                (lo - 0.5, hi + 0.5)
            } else {
                (lo, hi)
            }
        }
    };
    let group_column = opts.group.resolve(df, None);
    let group_of = match &group_column {
        Some(name) => input::labels(df, name)?,
        None => vec![column.to_string(); df.height()],
    };
    let groups = input::distinct(&group_of);
    let mut counts = vec![vec![0u64; opts.bins]; groups.len()];
    let width = (range.1 - range.0) / opts.bins as f64;
    for (row, v) in values.iter().enumerate() {
        let Some(v) = *v else { continue };
        if v < range.0 || v > range.1 {
            continue;
        }
        let bin = (((v - range.0) / width) as usize).min(opts.bins - 1);
        let g = groups
            .iter()
            .position(|x| *x == group_of[row])
            .expect("listed");
        counts[g][bin] += 1;
    }
    let chart = HistChart {
        title: Some(
            opts.frame
                .title
                .clone()
                .unwrap_or_else(|| format!("distribution of {column}")),
        ),
        x_label: opts
            .frame
            .x_label
            .clone()
            .unwrap_or_else(|| column.to_string()),
        y_label: opts
            .frame
            .y_label
            .clone()
            .unwrap_or_else(|| "count".to_string()),
        size: (
            opts.frame.width.unwrap_or(style::WIDTH),
            opts.frame.height.unwrap_or(style::HEIGHT),
        ),
        groups: if group_column.is_some() {
            groups
        } else {
            Vec::new()
        },
        range,
        bins: opts.bins,
        counts,
        show_counts: opts.counts,
    };
    canvas::render(&chart)
}

struct HistChart {
    title: Option<String>,
    x_label: String,
    y_label: String,
    size: (u32, u32),
    /// Group names; empty when ungrouped.
    groups: Vec<String>,
    range: (f64, f64),
    bins: usize,
    /// `counts[group][bin]`.
    counts: Vec<Vec<u64>>,
    show_counts: bool,
}

impl Figure for HistChart {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Drawn<DB> {
        let mut top = canvas::title(root, self.title.as_deref())?;
        let colors: Vec<RGBColor> = (0..self.counts.len()).map(style::color).collect();
        top += canvas::legend(root, &self.groups, &colors, top, !self.groups.is_empty())?;
        let highest = self
            .counts
            .iter()
            .flatten()
            .copied()
            .max()
            .unwrap_or(0)
            .max(1) as f64;
        let desc_h = style::measure("Ag", &style::font("Ag", LABEL_SIZE)).1 + 10;
        let tick_h = style::measure("0", &style::font("0", TICK_SIZE)).1 + 12;
        let tick_w = style::measure(&format!("{highest}"), &style::font("0", TICK_SIZE)).0 + 16;
        let body = root.margin(top, MARGIN, MARGIN, MARGIN + 8);
        let mut chart = ChartBuilder::on(&body)
            .x_label_area_size(tick_h + desc_h)
            .y_label_area_size(tick_w + desc_h)
            .build_cartesian_2d(self.range.0..self.range.1, 0.0..highest * 1.1)?;
        let x_fmt = |v: &f64| style::tick(*v);
        let y_fmt = |v: &f64| {
            if v.fract() == 0.0 {
                format!("{v:.0}")
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .axis_style(AXIS)
            .bold_line_style(GRID)
            .light_line_style(TRANSPARENT)
            .disable_x_mesh()
            .label_style(style::text_style("0", TICK_SIZE, &MUTED))
            .x_labels(self.bins.min(10) + 1)
            .y_labels((highest as usize + 1).min(6))
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .x_desc(self.x_label.as_str())
            .y_desc(self.y_label.as_str())
            .axis_desc_style(style::text_style(
                &format!("{}{}", self.x_label, self.y_label),
                LABEL_SIZE,
                &INK,
            ))
            .draw()?;
        let bin_width = (self.range.1 - self.range.0) / self.bins as f64;
        let groups = self.counts.len() as f64;
        let gap = bin_width * 0.06;
        let bar_width = (bin_width - 2.0 * gap) / groups;
        let bar_px = {
            let a = chart.backend_coord(&(self.range.0, 0.0));
            let b = chart.backend_coord(&(self.range.0 + bar_width, 0.0));
            b.0 - a.0
        };
        let value_font = style::font("0", VALUE_SIZE);
        let widest = style::measure(&format!("{}", highest as u64), &value_font).0;
        let label_counts = self.show_counts && widest <= bar_px + 4;
        for (g, counts) in self.counts.iter().enumerate() {
            for (bin, &count) in counts.iter().enumerate() {
                let x0 = self.range.0 + bin as f64 * bin_width + gap + g as f64 * bar_width;
                let x1 = x0 + bar_width;
                if count > 0 {
                    chart.draw_series(std::iter::once(Rectangle::new(
                        [(x0, 0.0), (x1, count as f64)],
                        colors[g].filled(),
                    )))?;
                }
                if label_counts && count > 0 {
                    let (x, y) = chart.backend_coord(&((x0 + x1) / 2.0, count as f64));
                    canvas::text(
                        root,
                        &count.to_string(),
                        (x, y - 3),
                        VALUE_SIZE,
                        &INK,
                        anchor(HPos::Center, VPos::Bottom),
                    )?;
                }
            }
        }
        Ok(())
    }
}
