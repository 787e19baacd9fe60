//! Radar charts: categories around a circle, one polygon per group (the Open-Medical-R1
//! study's chart of medical subjects per model).

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};

use super::canvas::{self, anchor, Drawn, Figure};
use super::style::{self, AXIS, GRID, INK, LABEL_SIZE, MARGIN, MUTED, TICK_SIZE};
use super::{input, Frame, Group, Plot, PlotError};

/// How [`radar`] draws a table.
#[derive(Debug, Clone, PartialEq)]
pub struct RadarOptions {
    /// Title and size (axis descriptions do not apply).
    pub frame: Frame,
    /// The column whose values make the polygons; by default `model` when the table has it.
    pub group: Group,
    /// The value at the centre and at the rim; by default 0 to 1 when every value lies
    /// there, else 0 to the largest value.
    pub range: Option<(f64, f64)>,
    /// Fill the polygons with a light wash of their colour.
    pub fill: bool,
}

impl Default for RadarOptions {
    fn default() -> Self {
        RadarOptions {
            frame: Frame::default(),
            group: Group::Auto,
            range: None,
            fill: true,
        }
    }
}

/// A radar chart of `value` per `category` (one spoke each, clockwise from the top in order
/// of first appearance), one polygon per group. A group without a row for a category skips
/// that spoke.
pub fn radar(
    df: &polars::prelude::DataFrame,
    category: &str,
    value: &str,
    opts: &RadarOptions,
) -> Result<Plot, PlotError> {
    input::not_empty(df)?;
    let category_of = input::labels(df, category)?;
    let values = input::numbers(df, value)?;
    let group_column = opts.group.resolve(df, Some("model"));
    let group_of = match &group_column {
        Some(name) => input::labels(df, name)?,
        None => vec![value.to_string(); df.height()],
    };
    if values.iter().all(Option::is_none) {
        return Err(PlotError::NoValues {
            column: value.to_string(),
        });
    }
    let categories = input::distinct(&category_of);
    if categories.len() < 3 {
        return Err(PlotError::Option {
            option: category.to_string(),
            message: format!(
                "a radar chart needs at least 3 categories, the column has {}",
                categories.len()
            ),
        });
    }
    let groups = input::distinct(&group_of);
    let mut points = vec![vec![None; categories.len()]; groups.len()];
    for row in 0..df.height() {
        let c = categories
            .iter()
            .position(|x| *x == category_of[row])
            .expect("listed");
        let g = groups
            .iter()
            .position(|x| *x == group_of[row])
            .expect("listed");
        if points[g][c].is_some() {
            return Err(PlotError::Duplicate {
                category: category_of[row].clone(),
                group: group_of[row].clone(),
            });
        }
        points[g][c] = values[row];
    }
    let range = match opts.range {
        Some((lo, hi)) if lo < hi => (lo, hi),
        Some((lo, hi)) => {
            return Err(PlotError::Option {
                option: "range".into(),
                message: format!("the centre value {lo} must be below the rim value {hi}"),
            })
        }
        None => {
            let present = values.iter().flatten();
            let lo = present.clone().fold(f64::INFINITY, |m, v| m.min(*v));
            let hi = present.fold(f64::NEG_INFINITY, |m, v| m.max(*v));
            if lo >= 0.0 && hi <= 1.0 {
                (0.0, 1.0)
            } else {
                (lo.min(0.0), hi.max(lo.min(0.0) + 1e-9))
            }
        }
    };
    let chart = RadarChart {
        title: Some(
            opts.frame
                .title
                .clone()
                .unwrap_or_else(|| format!("{value} by {category}")),
        ),
        size: (
            opts.frame.width.unwrap_or(style::WIDTH),
            opts.frame.height.unwrap_or(720),
        ),
        categories,
        groups,
        show_legend: group_column.is_some(),
        points,
        range,
        fill: opts.fill,
    };
    canvas::render(&chart)
}

struct RadarChart {
    title: Option<String>,
    size: (u32, u32),
    categories: Vec<String>,
    groups: Vec<String>,
    show_legend: bool,
    /// `points[group][category]`.
    points: Vec<Vec<Option<f64>>>,
    range: (f64, f64),
    fill: bool,
}

const RINGS: usize = 5;
/// The widest a spoke label may be before it wraps.
const LABEL_WIDTH: i32 = 170;

/// Where the spokes lie on the canvas: `n` spokes from `center`, `radius` pixels long, the
/// first pointing up.
struct Wheel {
    center: (i32, i32),
    radius: i32,
    n: usize,
}

impl Wheel {
    /// The angle of spoke `i`, clockwise from the top.
    fn angle(&self, i: usize) -> f64 {
        -std::f64::consts::FRAC_PI_2 + 2.0 * std::f64::consts::PI * i as f64 / self.n as f64
    }

    /// The pixel `fraction` of the way out along spoke `i`.
    fn at(&self, i: usize, fraction: f64) -> (i32, i32) {
        let a = self.angle(i);
        (
            self.center.0 + (a.cos() * self.radius as f64 * fraction).round() as i32,
            self.center.1 + (a.sin() * self.radius as f64 * fraction).round() as i32,
        )
    }
}

impl RadarChart {
    /// The grid: rings, spokes, and the rings' values.
    fn draw_grid<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        wheel: &Wheel,
    ) -> Drawn<DB> {
        let n = wheel.n;
        for ring in 1..=RINGS {
            let f = ring as f64 / RINGS as f64;
            let mut path: Vec<(i32, i32)> = (0..n).map(|i| wheel.at(i, f)).collect();
            path.push(wheel.at(0, f));
            let color = if ring == RINGS { AXIS } else { GRID };
            root.draw(&PathElement::new(
                path,
                ShapeStyle::from(&color).stroke_width(1),
            ))?;
        }
        for i in 0..n {
            root.draw(&PathElement::new(
                vec![wheel.center, wheel.at(i, 1.0)],
                ShapeStyle::from(&GRID).stroke_width(1),
            ))?;
        }
        // Ring values sit halfway between the first two spokes, off the data's corners.
        for ring in 1..=RINGS {
            let f = ring as f64 / RINGS as f64;
            let v = self.range.0 + f * (self.range.1 - self.range.0);
            let ((x0, y0), (x1, y1)) = (wheel.at(0, f), wheel.at(1, f));
            canvas::text(
                root,
                &style::tick((v * 1000.0).round() / 1000.0),
                ((x0 + x1) / 2 + 3, (y0 + y1) / 2),
                TICK_SIZE,
                &MUTED,
                anchor(HPos::Left, VPos::Bottom),
            )?;
        }
        Ok(())
    }

    /// One polygon per group: filled if asked, outlined, a dot at each value.
    fn draw_polygons<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        wheel: &Wheel,
        colors: &[RGBColor],
    ) -> Drawn<DB> {
        let fraction =
            |v: f64| ((v - self.range.0) / (self.range.1 - self.range.0)).clamp(0.0, 1.05);
        for (g, points) in self.points.iter().enumerate() {
            let vertices: Vec<(i32, i32)> = points
                .iter()
                .enumerate()
                .filter_map(|(i, v)| v.map(|v| wheel.at(i, fraction(v))))
                .collect();
            if vertices.len() >= 3 && self.fill {
                root.draw(&Polygon::new(
                    vertices.clone(),
                    colors[g].mix(0.10).filled(),
                ))?;
            }
            let mut outline = vertices.clone();
            if let Some(first) = vertices.first() {
                outline.push(*first);
            }
            root.draw(&PathElement::new(
                outline,
                ShapeStyle::from(&colors[g]).stroke_width(2),
            ))?;
            for v in vertices {
                root.draw(&Circle::new(v, 3, colors[g].filled()))?;
            }
        }
        Ok(())
    }

    /// The spoke labels (`line` pixels a line), placed outside the rim on the side they
    /// point to.
    fn draw_spoke_labels<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        wheel: &Wheel,
        labels: &[Vec<String>],
        line: i32,
    ) -> Drawn<DB> {
        for (i, label) in labels.iter().enumerate() {
            let a = wheel.angle(i);
            let (x, y) = wheel.at(i, 1.0);
            let (dx, dy) = (a.cos(), a.sin());
            let h = if dx > 0.3 {
                HPos::Left
            } else if dx < -0.3 {
                HPos::Right
            } else {
                HPos::Center
            };
            let block = label.len() as i32 * line;
            let x = x + (dx * 10.0).round() as i32;
            let first = if dy < -0.3 {
                y - 8 - block + line / 2
            } else if dy > 0.3 {
                y + 8 + line / 2
            } else {
                y - block / 2 + line / 2
            };
            for (k, text) in label.iter().enumerate() {
                canvas::text(
                    root,
                    text,
                    (x, first + k as i32 * line),
                    LABEL_SIZE,
                    &INK,
                    anchor(h, VPos::Center),
                )?;
            }
        }
        Ok(())
    }
}

impl Figure for RadarChart {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Drawn<DB> {
        let (width, height) = (self.size.0 as i32, self.size.1 as i32);
        let mut top = canvas::title(root, self.title.as_deref())?;
        let colors: Vec<RGBColor> = (0..self.groups.len()).map(style::color).collect();
        if self.show_legend {
            top += canvas::legend(root, &self.groups, &colors, top, true)?;
        }
        let labels: Vec<Vec<String>> = self
            .categories
            .iter()
            .map(|c| style::wrap(c, &style::font(c, LABEL_SIZE), LABEL_WIDTH, 2))
            .collect();
        let line = style::measure("Ag", &style::font("Ag", LABEL_SIZE)).1 + 3;
        let widest = labels
            .iter()
            .flatten()
            .map(|l| style::measure(l, &style::font(l, LABEL_SIZE)).0)
            .max()
            .unwrap_or(0);
        let wheel = Wheel {
            center: (width / 2, top + (height - top) / 2),
            radius: ((width / 2 - widest - MARGIN - 12)
                .min((height - top) / 2 - 2 * line - MARGIN - 8))
            .max(40),
            n: self.categories.len(),
        };
        self.draw_grid(root, &wheel)?;
        self.draw_polygons(root, &wheel, &colors)?;
        self.draw_spoke_labels(root, &wheel, &labels, line)
    }
}
