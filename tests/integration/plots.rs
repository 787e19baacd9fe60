//! Charts: every plot function renders PNG and SVG; bar heights and whiskers follow the
//! table; the embedded CJK font has a glyph for every character of the CMMLU subject names;
//! bad input names the column at fault.

use std::path::PathBuf;
use std::sync::Arc;

use polars::prelude::*;
use rlvr::report::{
    self, BarOptions, CurveLayout, CurveOptions, Group, HistOptions, Plot, RadarOptions,
};

/// Where the tests leave their charts, to look at after a run.
fn out(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join("rlvr-plots");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn keep(plot: &Plot, name: &str) {
    plot.save(&out(&format!("{name}.png"))).unwrap();
    plot.save(&out(&format!("{name}.svg"))).unwrap();
}

fn assert_renders(plot: &Plot) {
    assert_eq!(&plot.png()[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");
    assert!(plot.png().len() > 2_000, "the PNG holds a picture");
    let (w, h) = plot.dimensions();
    assert!(w >= 300 && h >= 300, "{w}x{h}");
    assert!(plot.svg().starts_with("<svg"), "an SVG document");
    assert!(plot.svg().contains(&format!("width=\"{w}\"")));
    assert!(plot.svg().matches("<text").count() >= 5, "labels are drawn");
}

/// A summary table as evaluation produces it.
fn summary() -> DataFrame {
    df!(
        "category" => ["stem", "humanities", "social_sciences", "other", "stem", "humanities", "social_sciences", "other"],
        "model" => ["base", "base", "base", "base", "tuned", "tuned", "tuned", "tuned"],
        "n" => [120i64, 90, 80, 100, 120, 90, 80, 100],
        "accuracy" => [0.40, 0.55, 0.62, 0.48, 0.46, 0.58, 0.66, 0.50],
        "ci_low" => [0.31, 0.45, 0.51, 0.38, 0.37, 0.48, 0.55, 0.40],
        "ci_high" => [0.49, 0.65, 0.72, 0.58, 0.55, 0.68, 0.76, 0.60],
    )
    .unwrap()
}

fn metrics() -> DataFrame {
    let steps: Vec<i64> = (1..=60).collect();
    let wobble = |i: i64| ((i * 7919) % 13) as f64 / 13.0 - 0.5;
    let reward: Vec<f64> = steps
        .iter()
        .map(|&s| 0.2 + 0.5 * (1.0 - (-(s as f64) / 20.0).exp()) + 0.1 * wobble(s))
        .collect();
    let loss: Vec<f64> = steps.iter().map(|&s| 0.02 * wobble(s + 3)).collect();
    let kl: Vec<f64> = steps
        .iter()
        .map(|&s| 0.001 * s as f64 + 0.0005 * wobble(s + 5))
        .collect();
    let len: Vec<f64> = steps
        .iter()
        .map(|&s| 180.0 - s as f64 + 10.0 * wobble(s + 1))
        .collect();
    df!("step" => steps, "loss" => loss, "reward" => reward, "kl" => kl, "completion_len" => len)
        .unwrap()
}

/// `(x, y, width, height)` of every `<rect>` filled with `color`, in drawing order.
fn rects(svg: &str, color: &str) -> Vec<(f64, f64, f64, f64)> {
    svg.split("<rect")
        .skip(1)
        .filter(|r| r.contains(&format!("fill=\"{color}\"")))
        .map(|r| {
            let attr = |name: &str| -> f64 {
                let start = r.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
                r[start..start + r[start..].find('"').unwrap()]
                    .parse()
                    .unwrap()
            };
            (attr("x"), attr("y"), attr("width"), attr("height"))
        })
        .collect()
}

/// The point lists of every `<polyline>` stroked in `color`.
fn polylines(svg: &str, color: &str) -> Vec<Vec<(f64, f64)>> {
    svg.split("<polyline")
        .skip(1)
        .filter(|p| p.contains(&format!("stroke=\"{color}\"")))
        .map(|p| {
            let start = p.find("points=\"").unwrap() + 8;
            p[start..start + p[start..].find('"').unwrap()]
                .split_whitespace()
                .map(|xy| {
                    let (x, y) = xy.split_once(',').unwrap();
                    (x.parse().unwrap(), y.parse().unwrap())
                })
                .collect()
        })
        .collect()
}

/// The text of every `<text>` element.
fn texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .map(|t| {
            let body = &t[t.find('>').unwrap() + 1..t.find("</text>").unwrap()];
            body.trim().to_string()
        })
        .collect()
}

const BLUE: &str = "#4E79A7";
const ORANGE: &str = "#F28E2B";
const INK: &str = "#262626";

#[test]
fn every_chart_renders_as_png_and_svg() {
    let bars = report::bars(&summary(), "category", "accuracy", &BarOptions::default()).unwrap();
    assert_renders(&bars);
    keep(&bars, "bars");
    let radar =
        report::radar(&summary(), "category", "accuracy", &RadarOptions::default()).unwrap();
    assert_renders(&radar);
    keep(&radar, "radar");
    let columns: Vec<String> = ["loss", "reward", "kl", "completion_len"]
        .map(String::from)
        .to_vec();
    let curves = report::curves(
        &metrics(),
        &columns,
        &CurveOptions {
            smooth: 0.6,
            ..Default::default()
        },
    )
    .unwrap();
    assert_renders(&curves);
    keep(&curves, "curves");
    let shared = report::curves(
        &metrics(),
        &columns[1..2],
        &CurveOptions {
            layout: CurveLayout::Shared,
            smooth: 0.8,
            ..Default::default()
        },
    )
    .unwrap();
    assert_renders(&shared);
    keep(&shared, "curves_shared");
    let rates = df!("pass_rate" => [0.0, 0.25, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.0, 0.5]).unwrap();
    let hist = report::hist(&rates, "pass_rate", &HistOptions::default()).unwrap();
    assert_renders(&hist);
    keep(&hist, "hist");
}

#[test]
fn charts_of_the_study_shapes_render() {
    // The study's radar: CMMLU's medical subjects in Chinese, three models.
    let subjects: Vec<&str> = rlvr::data::categories::cmmlu_subjects()
        .filter(|s| rlvr::data::categories::cmmlu(s).unwrap().medical)
        .collect();
    let mut subject = Vec::new();
    let mut model = Vec::new();
    let mut accuracy = Vec::new();
    for (m, name) in ["gemma-3-270m", "+ random 500", "+ judge-filtered 500"]
        .iter()
        .enumerate()
    {
        for (i, s) in subjects.iter().enumerate() {
            subject.push(rlvr::data::categories::cmmlu_chinese_name(s).unwrap());
            model.push(*name);
            accuracy.push(0.25 + 0.05 * m as f64 + ((i * 37) % 11) as f64 * 0.02);
        }
    }
    let medical = df!("subject" => subject, "model" => model, "accuracy" => accuracy).unwrap();
    let radar = report::radar(&medical, "subject", "accuracy", &RadarOptions::default()).unwrap();
    assert_renders(&radar);
    keep(&radar, "radar_cmmlu_medical");
    let bars = report::bars(&medical, "subject", "accuracy", &BarOptions::default()).unwrap();
    assert_renders(&bars);
    keep(&bars, "bars_cmmlu_medical");

    // Ten long English subjects, vertical: labels turn upward.
    let long: Vec<&str> = rlvr::data::categories::mmlu_subjects()
        .filter(|s| s.len() > 18)
        .take(10)
        .collect();
    let n = long.len();
    let table = df!("category" => long, "accuracy" => (0..n).map(|i| 0.3 + i as f64 * 0.05).collect::<Vec<_>>()).unwrap();
    let upward = report::bars(&table, "category", "accuracy", &BarOptions::default()).unwrap();
    assert_renders(&upward);
    assert!(upward.svg().contains("rotate(270"), "labels turned upward");
    keep(&upward, "bars_upward");

    // Pass rates of two judges, side by side in each bin.
    let judged = df!(
        "pass_rate" => [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 0.0, 0.0, 0.25, 0.5, 1.0, 0.75],
        "judge" => ["small", "small", "small", "small", "small", "small", "large", "large", "large", "large", "large", "large"],
    )
    .unwrap();
    let hist = report::hist(
        &judged,
        "pass_rate",
        &HistOptions {
            bins: 5,
            group: Group::Column("judge".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_renders(&hist);
    assert_eq!(
        rects(hist.svg(), BLUE).len() + rects(hist.svg(), ORANGE).len(),
        2 + 5 + 5,
        "swatches and non-empty bins"
    );
    keep(&hist, "hist_judges");
}

#[test]
fn bar_heights_follow_the_values() {
    let table = df!("category" => ["a", "b", "c"], "accuracy" => [0.2, 0.5, 0.8]).unwrap();
    let plot = report::bars(&table, "category", "accuracy", &BarOptions::default()).unwrap();
    let bars = rects(plot.svg(), BLUE);
    assert_eq!(bars.len(), 3, "one bar per row, no legend without groups");
    let unit = bars[2].3 / 0.8;
    for (bar, value) in bars.iter().zip([0.2, 0.5, 0.8]) {
        assert!(
            (bar.3 - value * unit).abs() <= 1.5,
            "height {} for {value}",
            bar.3
        );
    }
    // Same baseline, increasing left to right.
    assert!(bars
        .iter()
        .all(|b| (b.1 + b.3 - (bars[0].1 + bars[0].3)).abs() <= 1.0));
    assert!(bars[0].0 < bars[1].0 && bars[1].0 < bars[2].0);
    assert!(
        polylines(plot.svg(), INK).is_empty(),
        "no whiskers without intervals"
    );

    // Grouped: one colour per model (the first rect of each colour is its legend swatch).
    let plot = report::bars(&summary(), "category", "accuracy", &BarOptions::default()).unwrap();
    let base = rects(plot.svg(), BLUE);
    let tuned = rects(plot.svg(), ORANGE);
    assert_eq!((base.len(), tuned.len()), (5, 5));
    let accuracy = summary()
        .column("accuracy")
        .unwrap()
        .f64()
        .unwrap()
        .to_vec();
    let unit = base[1].3 / accuracy[0].unwrap();
    for (bar, value) in base[1..].iter().chain(&tuned[1..]).zip(accuracy) {
        assert!(
            (bar.3 - value.unwrap() * unit).abs() <= 1.5,
            "height {} for {value:?}",
            bar.3
        );
    }
    let written = texts(plot.svg());
    for label in [
        "base",
        "tuned",
        "0.400",
        "0.660",
        "stem",
        "social_sciences",
        "accuracy by category",
    ] {
        assert!(
            written.iter().any(|t| t == label),
            "{label} missing from {written:?}"
        );
    }
}

#[test]
fn values_at_the_top_of_a_given_range_are_written_clear_of_the_legend() {
    let table = df!(
        "category" => ["a", "b", "a", "b"],
        "model" => ["x", "x", "y", "y"],
        "accuracy" => [1.0, 0.5, 1.0, 0.25],
    )
    .unwrap();
    let opts = BarOptions {
        range: Some((0.0, 1.0)),
        digits: Some(2),
        ..BarOptions::default()
    };
    let plot = report::bars(&table, "category", "accuracy", &opts).unwrap();
    let svg = plot.svg();
    let legend_bottom = [BLUE, ORANGE]
        .iter()
        .map(|c| {
            let swatch = rects(svg, c)[0];
            swatch.1 + swatch.3
        })
        .fold(0.0, f64::max);
    let number = |t: &str, name: &str| -> f64 {
        let start = t.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
        t[start..start + t[start..].find('"').unwrap()]
            .parse()
            .unwrap()
    };
    let tops: Vec<&str> = svg
        .split("<text")
        .skip(1)
        .filter(|t| {
            t[t.find('>').unwrap() + 1..]
                .trim_start()
                .starts_with("1.00")
        })
        .collect();
    assert_eq!(tops.len(), 2, "both values at the top are written");
    for t in tops {
        // bottom-anchored: the glyphs lie above y, at most a font size tall
        let top = number(t, "y") - number(t, "font-size");
        assert!(
            top > legend_bottom,
            "a value's text reaches {top}, the legend ends at {legend_bottom}"
        );
    }
    keep(&plot, "bars_fixed_range");
}

#[test]
fn value_labels_of_neighbouring_bars_of_equal_height_do_not_run_together() {
    // five models, five benchmarks, equal values and intervals on some: the study's overall chart
    let models = ["a", "b", "c", "d", "e"];
    let mut category = Vec::new();
    let mut model = Vec::new();
    let (mut value, mut low, mut high) = (Vec::new(), Vec::new(), Vec::new());
    for c in ["MMLU", "CMMLU", "MMLU-Pro", "GSM8K", "MedQA"] {
        for (i, m) in models.iter().enumerate() {
            category.push(c);
            model.push(*m);
            let v = if c == "MMLU" {
                0.2 + 0.05 * i as f64
            } else {
                0.083
            };
            value.push(v);
            low.push(v / 2.0);
            high.push(v + 0.4);
        }
    }
    let table = df!(
        "benchmark" => category,
        "model" => model,
        "accuracy" => value,
        "low" => low,
        "high" => high,
    )
    .unwrap();
    let opts = BarOptions {
        interval: Some(("low".into(), "high".into())),
        ..BarOptions::default()
    };
    let plot = report::bars(&table, "benchmark", "accuracy", &opts).unwrap();
    let svg = plot.svg();
    let attr = |t: &str, name: &str| -> f64 {
        let start = t.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
        t[start..start + t[start..].find('"').unwrap()]
            .parse()
            .unwrap()
    };
    // every value label's box: centred on x, bottom-anchored on y, 0.55 em a digit
    let boxes: Vec<(f64, f64, f64, f64)> = svg
        .split("<text")
        .skip(1)
        .filter_map(|t| {
            let body = t[t.find('>').unwrap() + 1..t.find("</text>").unwrap()].trim();
            (body.starts_with("0.") && body.len() == 5).then(|| {
                let size = attr(t, "font-size");
                let half = body.len() as f64 * size * 0.55 / 2.0;
                let (x, y) = (attr(t, "x"), attr(t, "y"));
                (x - half, x + half, y - size * 0.8, y)
            })
        })
        .collect();
    assert_eq!(boxes.len(), 25, "every bar has its value written");
    for (i, a) in boxes.iter().enumerate() {
        for b in &boxes[i + 1..] {
            let apart = a.1 <= b.0 || b.1 <= a.0 || a.3 <= b.2 || b.3 <= a.2;
            assert!(apart, "value labels overlap: {a:?} and {b:?}");
        }
    }
    keep(&plot, "bars_equal_neighbours");
}

#[test]
fn whiskers_span_the_intervals() {
    let plot = report::bars(&summary(), "category", "accuracy", &BarOptions::default()).unwrap();
    let whiskers = polylines(plot.svg(), INK);
    assert_eq!(whiskers.len(), 8 * 3, "a stem and two caps per bar");
    let base = rects(plot.svg(), BLUE);
    let unit = base[1].3 / 0.40;
    for (i, (low, high)) in [(0.31, 0.49), (0.45, 0.65), (0.51, 0.72), (0.38, 0.58)]
        .into_iter()
        .enumerate()
    {
        let stem = &whiskers[i * 3];
        assert_eq!(stem.len(), 2);
        let length = (stem[0].1 - stem[1].1).abs();
        assert!(
            (length - (high - low) * unit).abs() <= 2.0,
            "stem {length} for [{low}, {high}]"
        );
        let bar_mid = base[i + 1].0 + base[i + 1].2 / 2.0;
        assert!(
            (stem[0].0 - bar_mid).abs() <= 1.5,
            "the whisker stands on its bar"
        );
    }
    let none = report::bars(
        &summary(),
        "category",
        "accuracy",
        &BarOptions {
            whiskers: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(polylines(none.svg(), INK).is_empty());
    let named = df!("c" => ["x", "y", "z"], "v" => [1.0, 2.0, 3.0], "lo" => [0.5, 1.5, 2.0], "hi" => [1.5, 2.5, 4.0]).unwrap();
    let plot = report::bars(
        &named,
        "c",
        "v",
        &BarOptions {
            interval: Some(("lo".into(), "hi".into())),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(polylines(plot.svg(), INK).len(), 9);
}

#[test]
fn many_long_categories_lie_horizontal_and_chinese_names_draw_in_the_cjk_font() {
    let subjects: Vec<&str> = rlvr::data::categories::cmmlu_subjects().collect();
    let names: Vec<String> = subjects
        .iter()
        .map(|s| {
            rlvr::data::categories::cmmlu_chinese_name(s)
                .unwrap()
                .to_string()
        })
        .collect();
    let accuracy: Vec<f64> = (0..names.len())
        .map(|i| 0.25 + (i % 9) as f64 * 0.07)
        .collect();
    let table = df!("category" => names.clone(), "accuracy" => accuracy).unwrap();
    let plot = report::bars(&table, "category", "accuracy", &BarOptions::default()).unwrap();
    keep(&plot, "bars_cmmlu");
    let bars = rects(plot.svg(), BLUE);
    assert_eq!(bars.len(), names.len());
    assert!(bars.iter().all(|b| b.2 > b.3), "bars run left to right");
    for name in &names {
        assert!(
            plot.svg()
                .contains(&format!("font-family=\"{}\"", report::fonts::CJK))
                && plot.svg().contains(name.as_str()),
            "{name} is written in the CJK font"
        );
    }
    let long = df!(
        "category" => ["high_school_government_and_politics", "professional_medicine", "college_computer_science", "miscellaneous"],
        "accuracy" => [0.5, 0.6, 0.7, 0.4],
    )
    .unwrap();
    keep(
        &report::bars(&long, "category", "accuracy", &BarOptions::default()).unwrap(),
        "bars_long_labels",
    );
}

/// A glyph drawn alone on a small canvas, as grey levels.
fn glyph_pixels(c: char) -> Vec<u8> {
    use plotters::prelude::*;
    report::fonts::register();
    let mut buffer = vec![255u8; 48 * 48 * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (48, 48)).into_drawing_area();
        let font: FontDesc = (FontFamily::Name(report::fonts::CJK), 32.0).into();
        root.draw_text(&c.to_string(), &font.color(&BLACK), (6, 6))
            .unwrap();
        root.present().unwrap();
    }
    buffer
}

#[test]
fn the_cjk_font_has_a_glyph_for_every_character_of_the_cmmlu_subject_names() {
    let missing = glyph_pixels('\u{E000}'); // a private-use character no font maps
    let blank = vec![255u8; 48 * 48 * 3];
    assert_ne!(missing, blank, "the missing glyph is drawn as a box");
    assert_eq!(
        glyph_pixels('한'),
        missing,
        "control: a character outside the subset (hangul) draws as the box"
    );
    let mut chars: Vec<char> = rlvr::data::categories::cmmlu_subjects()
        .flat_map(|s| {
            rlvr::data::categories::cmmlu_chinese_name(s)
                .unwrap()
                .chars()
        })
        .collect();
    chars.extend("准确率模型类别".chars());
    chars.sort();
    chars.dedup();
    assert!(chars.len() > 140, "{} distinct characters", chars.len());
    for c in chars {
        let pixels = glyph_pixels(c);
        assert_ne!(pixels, missing, "{c} draws as the missing-glyph box");
        assert_ne!(pixels, blank, "{c} draws nothing");
    }
}

#[test]
fn radar_draws_one_polygon_per_model() {
    let plot = report::radar(&summary(), "category", "accuracy", &RadarOptions::default()).unwrap();
    let outlines: Vec<_> = polylines(plot.svg(), BLUE)
        .into_iter()
        .chain(polylines(plot.svg(), ORANGE))
        .collect();
    assert_eq!(outlines.len(), 2);
    assert!(outlines.iter().all(|o| o.len() == 5), "4 spokes, closed");
    let written = texts(plot.svg());
    for spoke in [
        "stem",
        "humanities",
        "social_sciences",
        "other",
        "base",
        "tuned",
    ] {
        assert!(
            written.iter().any(|t| t == spoke),
            "{spoke} missing from {written:?}"
        );
    }
    let err = report::radar(
        &summary().head(Some(2)),
        "category",
        "accuracy",
        &RadarOptions {
            group: Group::Off,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("at least 3 categories"), "{err}");
}

#[test]
fn curves_draw_raw_and_smoothed_lines() {
    let columns = vec!["reward".to_string()];
    let raw = report::curves(&metrics(), &columns, &CurveOptions::default()).unwrap();
    let smoothed = report::curves(
        &metrics(),
        &columns,
        &CurveOptions {
            smooth: 0.6,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(polylines(raw.svg(), BLUE).len(), 1);
    let lines = polylines(smoothed.svg(), BLUE);
    assert_eq!(lines.len(), 2, "raw (faint) and smoothed");
    assert!(
        smoothed.svg().contains("opacity=\"0.28\""),
        "the raw line is faint"
    );
    let wiggle = |l: &[(f64, f64)]| l.windows(2).map(|w| (w[1].1 - w[0].1).abs()).sum::<f64>();
    assert!(
        wiggle(&lines[1]) < wiggle(&lines[0]) * 0.7,
        "smoothing calms the line"
    );
    let err = report::curves(
        &metrics(),
        &["reward".to_string()],
        &CurveOptions {
            smooth: 1.0,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("smooth"), "{err}");
}

#[test]
fn a_short_run_has_a_tick_per_step_and_none_between() {
    let metrics = df!("step" => [1i64, 2, 3], "reward" => [10.0, 20.0, 30.0]).unwrap();
    let plot = report::curves(&metrics, &["reward".to_string()], &CurveOptions::default()).unwrap();
    let written = texts(plot.svg());
    for step in ["1", "2", "3"] {
        assert!(
            written.iter().any(|t| t == step),
            "{step} missing from {written:?}"
        );
    }
    assert!(
        !written.iter().any(|t| t.contains('.')),
        "no fractional ticks: {written:?}"
    );
}

#[test]
fn histogram_bars_count_the_values_in_each_bin() {
    let rates = df!("pass_rate" => [0.0, 0.25, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.0, 0.5]).unwrap();
    let plot = report::hist(
        &rates,
        "pass_rate",
        &HistOptions {
            bins: 4,
            ..Default::default()
        },
    )
    .unwrap();
    // Bins [0, .25) [.25, .5) [.5, .75) [.75, 1]: 2, 2, 2, 4.
    let bars = rects(plot.svg(), BLUE);
    assert_eq!(bars.len(), 4);
    let unit = bars[3].3 / 4.0;
    for (bar, count) in bars.iter().zip([2.0, 2.0, 2.0, 4.0]) {
        assert!(
            (bar.3 - count * unit).abs() <= 1.5,
            "height {} for {count}",
            bar.3
        );
    }
}

#[test]
fn bad_input_names_the_column() {
    let err = report::bars(&summary(), "category", "nope", &BarOptions::default()).unwrap_err();
    assert!(err.to_string().contains("no column `nope`"), "{err}");
    assert!(
        err.to_string().contains("`accuracy`"),
        "lists the columns: {err}"
    );
    let err = report::bars(&summary(), "category", "model", &BarOptions::default()).unwrap_err();
    assert_eq!(err.to_string(), "column `model` must be numeric, not str");
    let err = report::hist(&summary(), "category", &HistOptions::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("column `category` must be numeric"),
        "{err}"
    );
    let err = report::curves(
        &metrics(),
        &["rewards".to_string()],
        &CurveOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("no column `rewards`"), "{err}");
    let err = report::radar(
        &summary(),
        "category",
        "accuracy",
        &RadarOptions {
            group: Group::Column("judge".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("no column `judge`"), "{err}");
    let doubled = report::bars(
        &summary(),
        "category",
        "accuracy",
        &BarOptions {
            group: Group::Off,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        doubled.to_string().contains("two rows for `stem`"),
        "{doubled}"
    );
    let empty = summary().head(Some(0));
    let err = report::bars(&empty, "category", "accuracy", &BarOptions::default()).unwrap_err();
    assert!(err.to_string().contains("no rows"), "{err}");
}

#[test]
fn scripts_plot_save_and_fail_with_the_column_named() {
    let dir = out("script");
    let mut session = rlvr::script::Session::new(
        Arc::new(rlvr::script::StdOutput::new(true)),
        rhai::Map::new(),
    );
    let code = format!(
        r#"
        let items = load("mmlu", "data/samples/mmlu");
        let by = items.sql("SELECT category, count(*) AS n, avg(CAST(medical AS INT)) AS accuracy FROM self GROUP BY category ORDER BY category");
        let p = plot_bars(by, "category", "accuracy", #{{ title: "medical share", digits: 2 }});
        p.save("{0}/bars.png");
        p.save("{0}/bars.svg");
        plot_hist(by, "n", #{{ bins: 5 }}).save("{0}/hist.png");
        p
        "#,
        dir.display()
    );
    let plot = session.eval("<plots>", &code).unwrap();
    assert!(plot.clone().try_cast::<Plot>().is_some());
    assert!(rlvr::script::render_text(&plot).starts_with("<plot 960×600"));
    assert_eq!(
        &std::fs::read(dir.join("bars.png")).unwrap()[..4],
        b"\x89PNG"
    );
    assert!(std::fs::read_to_string(dir.join("bars.svg"))
        .unwrap()
        .contains("medical share"));
    assert!(dir.join("hist.png").is_file());
    let err = session
        .eval(
            "<bad>",
            r#"plot_bars(load("mmlu", "data/samples/mmlu"), "subject", "accuracy")"#,
        )
        .unwrap_err();
    assert!(
        err.message.contains("no column `accuracy`"),
        "{}",
        err.message
    );
    let err = session
        .eval(
            "<bad>",
            r#"plot_bars(load("mmlu", "data/samples/mmlu"), "subject", "question")"#,
        )
        .unwrap_err();
    assert!(
        err.message.contains("column `question` must be numeric"),
        "{}",
        err.message
    );
    let err = session
        .eval(
            "<bad>",
            r#"plot_hist(load("mmlu", "data/samples/mmlu"), "medical", #{ bin: 3 })"#,
        )
        .unwrap_err();
    assert!(
        err.message.contains("unknown option `bin`"),
        "{}",
        err.message
    );
}
