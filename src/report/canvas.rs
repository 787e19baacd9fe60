//! Drawing one chart twice, as SVG and as PNG, and the pieces every chart shares: titles,
//! legends, text in the right font.

use std::sync::atomic::{AtomicU64, Ordering};

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontTransform;

use super::style::{self, INK, LABEL_SIZE, MARGIN, TITLE_SIZE};
use super::{Plot, PlotError};

/// The result of drawing on a backend.
pub type Drawn<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// A chart with numbers on both axes, as bars and curves draw on.
pub type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A chart that can draw itself on any plotters backend.
pub trait Figure {
    /// Canvas width and height in pixels.
    fn size(&self) -> (u32, u32);
    /// Draws the chart on a white canvas of [`Figure::size`].
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Drawn<DB>;
}

/// Draws `figure` as SVG and as PNG.
pub fn render(figure: &impl Figure) -> Result<Plot, PlotError> {
    super::fonts::register();
    let size = figure.size();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        figure.draw(&root).map_err(draw_error)?;
        root.present().map_err(draw_error)?;
    }
    Ok(Plot::new(png(figure, size)?, svg))
}

/// The PNG of `figure`, encoded by plotters' bitmap backend through a temporary file.
fn png(figure: &impl Figure, size: (u32, u32)) -> Result<Vec<u8>, PlotError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "rlvr-plot-{}-{}.png",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let drawn = (|| {
        let root = BitMapBackend::new(&path, size).into_drawing_area();
        root.fill(&WHITE)?;
        figure.draw(&root)?;
        root.present()
    })();
    let bytes = drawn
        .map_err(draw_error)
        .and_then(|()| std::fs::read(&path).map_err(|e| PlotError::Draw(e.to_string())));
    let _ = std::fs::remove_file(&path);
    bytes
}

fn draw_error(e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// Where a piece of text hangs from its anchor point.
pub fn anchor(h: HPos, v: VPos) -> Pos {
    Pos::new(h, v)
}

/// Draws one line of `text` at `at`, in the font that covers it.
pub fn text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    at: (i32, i32),
    size: f64,
    color: &RGBColor,
    pos: Pos,
) -> Drawn<DB> {
    let style = style::text_style(text, size, color).pos(pos);
    area.draw_text(text, &style, at)
}

/// Draws `text` turned a quarter to the left (read from bottom to top), its end at `at`
/// when `pos` is right-anchored.
pub fn text_upward<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    at: (i32, i32),
    size: f64,
    color: &RGBColor,
    pos: Pos,
) -> Drawn<DB> {
    let style = style::font(text, size)
        .transform(FontTransform::Rotate270)
        .color(color)
        .pos(pos);
    area.draw_text(text, &style, at)
}

/// Draws the title centred at the top and returns the height it took (0 without a title).
pub fn title<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: Option<&str>,
) -> Result<i32, DrawingAreaErrorKind<DB::ErrorType>> {
    let Some(title) = title.filter(|t| !t.is_empty()) else {
        return Ok(MARGIN);
    };
    let (width, _) = root.dim_in_pixel();
    let font = style::bold(title, TITLE_SIZE);
    let line = style::ellipsize(title, &font, width as i32 - 2 * MARGIN);
    let (_, h) = style::measure(&line, &font);
    root.draw_text(
        &line,
        &font.color(&INK).pos(anchor(HPos::Center, VPos::Top)),
        (width as i32 / 2, MARGIN),
    )?;
    Ok(MARGIN + h + 12)
}

/// Rows of legend entries (a colour swatch and a name) that fit `width` pixels.
pub fn legend_rows(names: &[String], width: i32) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut used = 0;
    for (i, name) in names.iter().enumerate() {
        let w = legend_entry_width(name);
        if rows.is_empty() || used + w > width {
            rows.push(Vec::new());
            used = 0;
        }
        rows.last_mut().expect("a row exists").push(i);
        used += w;
    }
    rows
}

fn legend_entry_width(name: &str) -> i32 {
    let font = style::font(name, LABEL_SIZE);
    style::measure(name, &font).0 + LEGEND_SWATCH + 8 + 24
}

const LEGEND_SWATCH: i32 = 14;
const LEGEND_ROW: i32 = 26;

/// The height a legend of `names` takes in `width` pixels (0 for fewer than two names unless
/// `always`).
pub fn legend_height(names: &[String], width: i32, always: bool) -> i32 {
    if names.len() < 2 && !always {
        return 0;
    }
    legend_rows(names, width).len() as i32 * LEGEND_ROW + 6
}

/// Draws a centred legend of `names` (entry `i` in `colors[i]`) with its top at `top`, and
/// returns its height.
pub fn legend<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    names: &[String],
    colors: &[RGBColor],
    top: i32,
    always: bool,
) -> Result<i32, DrawingAreaErrorKind<DB::ErrorType>> {
    let (width, _) = root.dim_in_pixel();
    let width = width as i32 - 2 * MARGIN;
    let height = legend_height(names, width, always);
    if height == 0 {
        return Ok(0);
    }
    for (r, row) in legend_rows(names, width).iter().enumerate() {
        let row_width: i32 = row
            .iter()
            .map(|&i| legend_entry_width(&names[i]))
            .sum::<i32>()
            - 24;
        let mut x = MARGIN + (width - row_width).max(0) / 2;
        let y = top + r as i32 * LEGEND_ROW + LEGEND_ROW / 2;
        for &i in row {
            root.draw(&Rectangle::new(
                [
                    (x, y - LEGEND_SWATCH / 2),
                    (x + LEGEND_SWATCH, y + LEGEND_SWATCH / 2),
                ],
                colors[i].filled(),
            ))?;
            text(
                root,
                &names[i],
                (x + LEGEND_SWATCH + 8, y),
                LABEL_SIZE,
                &INK,
                anchor(HPos::Left, VPos::Center),
            )?;
            x += legend_entry_width(&names[i]);
        }
    }
    Ok(height)
}
