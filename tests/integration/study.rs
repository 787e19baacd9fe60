//! The study script (`scripts/open_medical_r1.rhai`) and the four workshop labs
//! (`scripts/workshop/lab*.rhai`) run end to end through `rlvr run`, shortened with `--set`,
//! on the tiny random-weight fixtures: their tables have the expected columns and rows,
//! their PNG files decode (chunk CRCs, zlib stream, scanline filters) to pictures of a
//! sensible size, and their bar charts follow the tables: each bar's height in the SVG is
//! its value on one scale, and the same bar in the PNG is as many pixels tall.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::Device;
use polars::prelude::*;
use rlvr::model::lm::LanguageModel;
use rlvr::report::{self, style::PALETTE, BarOptions};

use crate::repo;

// ---- running scripts -----------------------------------------------------------------------

/// A scratch folder for one test, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rlvr-study-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A model folder holding a tiny fixture's weights with the tiny tokenizer beside them,
/// as `model(…)` takes a folder.
fn tiny_model(dir: &Path, fixture: &str) -> PathBuf {
    let model = dir.join(fixture);
    std::fs::create_dir_all(&model).unwrap();
    for f in [
        format!("tests/fixtures/{fixture}/config.json"),
        format!("tests/fixtures/{fixture}/model.safetensors"),
        "tests/fixtures/tiny-tokenizer/tokenizer.json".to_string(),
        "tests/fixtures/tiny-tokenizer/tokenizer_config.json".to_string(),
    ] {
        let from = repo(&f);
        std::fs::copy(&from, model.join(from.file_name().unwrap())).unwrap();
    }
    model
}

/// `rlvr run SCRIPT --quiet --out OUT --set …` from the repository root with its own
/// `RLVR_HOME` (nothing cached from other runs); fails the test with the script's output
/// when it fails.
fn run(script: &str, dir: &Path, sets: &[String]) -> PathBuf {
    let out = dir.join("run");
    let mut command = Command::new(env!("CARGO_BIN_EXE_rlvr"));
    command
        .current_dir(repo(""))
        .env("RLVR_HOME", dir.join("home"))
        .args(["run", script, "--quiet", "--out"])
        .arg(&out);
    for set in sets {
        command.args(["--set", set]);
    }
    let output: Output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{script} failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

// ---- tables ----------------------------------------------------------------------------

/// A CSV file as its header and rows of named cells.
struct Csv {
    columns: Vec<String>,
    rows: Vec<BTreeMap<String, String>>,
}

impl Csv {
    fn read(path: &Path) -> Csv {
        let mut reader =
            csv::Reader::from_path(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let columns: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
        let rows = reader
            .records()
            .map(|r| {
                let r = r.unwrap();
                columns
                    .iter()
                    .cloned()
                    .zip(r.iter().map(String::from))
                    .collect()
            })
            .collect();
        Csv { columns, rows }
    }

    fn has_columns(&self, wanted: &[&str]) {
        for c in wanted {
            assert!(
                self.columns.iter().any(|h| h == c),
                "no column {c} in {:?}",
                self.columns
            );
        }
    }

    fn number(row: &BTreeMap<String, String>, column: &str) -> f64 {
        row[column]
            .parse()
            .unwrap_or_else(|_| panic!("{column} = {:?} is not a number", row[column]))
    }

    /// The distinct values of `column` in order of first appearance.
    fn distinct(&self, column: &str) -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        for row in &self.rows {
            if !seen.contains(&row[column]) {
                seen.push(row[column].clone());
            }
        }
        seen
    }

    /// The values of `value` per value of `group` (in order of first appearance), each in
    /// row order: how a grouped bar chart draws them.
    fn grouped(&self, group: &str, value: &str) -> Vec<Vec<f64>> {
        self.distinct(group)
            .iter()
            .map(|g| {
                self.rows
                    .iter()
                    .filter(|r| &r[group] == g)
                    .map(|r| Csv::number(r, value))
                    .collect()
            })
            .collect()
    }
}

// ---- pictures ----------------------------------------------------------------------------

/// A decoded PNG: 8-bit RGB(A), rows top to bottom.
#[derive(Debug)]
struct Image {
    width: usize,
    height: usize,
    channels: usize,
    pixels: Vec<u8>,
}

impl Image {
    fn rgb(&self, x: usize, y: usize) -> [u8; 3] {
        let at = (y * self.width + x) * self.channels;
        [self.pixels[at], self.pixels[at + 1], self.pixels[at + 2]]
    }
}

/// Decodes a PNG file: checks the signature and every chunk's CRC, inflates the IDAT
/// stream and undoes the scanline filters (8-bit RGB or RGBA, not interlaced: what the
/// plots write).
fn decode_png(bytes: &[u8]) -> Result<Image, String> {
    if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Err("no PNG signature".into());
    }
    let mut at = 8;
    let (mut width, mut height, mut channels) = (0usize, 0usize, 0usize);
    let mut data = Vec::new();
    let mut ended = false;
    while at + 12 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let kind = &bytes[at + 4..at + 8];
        let Some(body) = bytes.get(at + 8..at + 8 + len) else {
            return Err("a chunk runs past the end".into());
        };
        let stored = u32::from_be_bytes(bytes[at + 8 + len..at + 12 + len].try_into().unwrap());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(body);
        if crc.sum() != stored {
            return Err(format!("bad CRC in {}", String::from_utf8_lossy(kind)));
        }
        match kind {
            b"IHDR" => {
                width = u32::from_be_bytes(body[0..4].try_into().unwrap()) as usize;
                height = u32::from_be_bytes(body[4..8].try_into().unwrap()) as usize;
                let (depth, color, interlace) = (body[8], body[9], body[12]);
                channels = match (depth, color, interlace) {
                    (8, 2, 0) => 3,
                    (8, 6, 0) => 4,
                    _ => {
                        return Err(format!(
                        "unsupported: depth {depth}, colour type {color}, interlace {interlace}"
                    ))
                    }
                };
            }
            b"IDAT" => data.extend_from_slice(body),
            b"IEND" => {
                ended = true;
                break;
            }
            _ => {}
        }
        at += 12 + len;
    }
    if !ended || width == 0 || height == 0 {
        return Err("no IHDR or IEND".into());
    }
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&data[..])
        .read_to_end(&mut raw)
        .map_err(|e| format!("zlib: {e}"))?;
    let stride = width * channels;
    if raw.len() != height * (stride + 1) {
        return Err(format!(
            "{} bytes of scanlines for {width}x{height}",
            raw.len()
        ));
    }
    let mut pixels = vec![0u8; height * stride];
    for y in 0..height {
        let filter = raw[y * (stride + 1)];
        let line = &raw[y * (stride + 1) + 1..(y + 1) * (stride + 1)];
        for i in 0..stride {
            let left = if i >= channels {
                pixels[y * stride + i - channels]
            } else {
                0
            } as i32;
            let up = if y > 0 {
                pixels[(y - 1) * stride + i]
            } else {
                0
            } as i32;
            let corner = if y > 0 && i >= channels {
                pixels[(y - 1) * stride + i - channels]
            } else {
                0
            } as i32;
            let predicted = match filter {
                0 => 0,
                1 => left,
                2 => up,
                3 => (left + up) / 2,
                4 => {
                    let p = left + up - corner;
                    let (pa, pb, pc) = ((p - left).abs(), (p - up).abs(), (p - corner).abs());
                    if pa <= pb && pa <= pc {
                        left
                    } else if pb <= pc {
                        up
                    } else {
                        corner
                    }
                }
                f => return Err(format!("unknown filter {f} on row {y}")),
            };
            pixels[y * stride + i] = (line[i] as i32 + predicted) as u8;
        }
    }
    Ok(Image {
        width,
        height,
        channels,
        pixels,
    })
}

/// A chart file: a PNG that decodes to a picture of a sensible size with more than a
/// handful of colours (text, bars or lines on the background).
fn picture(path: &Path) -> Image {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let image = decode_png(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        (300..=4000).contains(&image.width) && (300..=4000).contains(&image.height),
        "{}: {}x{}",
        path.display(),
        image.width,
        image.height
    );
    let mut colours = std::collections::HashSet::new();
    for y in (0..image.height).step_by(3) {
        for x in (0..image.width).step_by(3) {
            colours.insert(image.rgb(x, y));
        }
    }
    assert!(
        colours.len() > 8,
        "{}: {} colours",
        path.display(),
        colours.len()
    );
    image
}

/// An SVG `<rect>`: x, y, width, height.
type Rect = (f64, f64, f64, f64);

fn hex(c: &plotters::style::RGBColor) -> String {
    format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
}

/// `(x, y, width, height)` of every `<rect>` filled with `color`, in drawing order.
fn rects(svg: &str, color: &str) -> Vec<Rect> {
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

/// The bars of a grouped vertical bar chart, per group (palette colour `i` for group `i`),
/// without the legend's swatch when there is a legend.
fn bars_of(svg: &str, groups: usize, legend: bool) -> Vec<Vec<Rect>> {
    (0..groups)
        .map(|g| {
            let all = rects(svg, &hex(&PALETTE[g]));
            all.into_iter().skip(usize::from(legend)).collect()
        })
        .collect()
}

/// Whether vertical bars stand for `values` (per group, in drawing order): one bar per
/// value, all on one baseline, each as tall as its value on one scale (within 1.5 px).
fn bars_follow(bars: &[Vec<Rect>], values: &[Vec<f64>]) -> Result<(), String> {
    if bars.len() != values.len() {
        return Err(format!(
            "{} groups of bars for {} groups of values",
            bars.len(),
            values.len()
        ));
    }
    let all: Vec<(&Rect, f64)> = bars
        .iter()
        .zip(values)
        .flat_map(|(b, v)| b.iter().zip(v.iter().copied()))
        .collect();
    for (g, (b, v)) in bars.iter().zip(values).enumerate() {
        if b.len() != v.len() {
            return Err(format!(
                "group {g}: {} bars for {} values",
                b.len(),
                v.len()
            ));
        }
    }
    let (tallest, top) = all
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(r, v)| (r.3, *v))
        .ok_or("no bars")?;
    if top <= 0.0 {
        return Err("every value is 0: nothing to compare".into());
    }
    let unit = tallest / top;
    let baseline = all[0].0 .1 + all[0].0 .3;
    for (rect, value) in &all {
        if (rect.3 - value * unit).abs() > 1.5 {
            return Err(format!(
                "a bar {} px tall stands for {value}; at {unit:.1} px per unit it should be {:.1}",
                rect.3,
                value * unit
            ));
        }
        if (rect.1 + rect.3 - baseline).abs() > 1.0 {
            return Err(format!(
                "a bar ends at {} px, not on the baseline {baseline}",
                rect.1 + rect.3
            ));
        }
    }
    Ok(())
}

/// Each SVG bar measured in the PNG: in a column a sixth into the bar (clear of the
/// whisker), the run of the bar's colour up from its baseline is as tall as the SVG rect.
fn png_bars_match(image: &Image, bars: &[Vec<Rect>]) {
    for (g, group) in bars.iter().enumerate() {
        let colour = [PALETTE[g].0, PALETTE[g].1, PALETTE[g].2];
        for &(x, y, w, h) in group {
            let column = (x + w / 6.0).round() as usize;
            let mut row = (y + h).round() as usize;
            // from the baseline up past the axis line to the bar's first pixel
            while row > 0 && image.rgb(column, row) != colour && (y + h) as usize - row < 3 {
                row -= 1;
            }
            let mut run = 0;
            while row > 0 && image.rgb(column, row) == colour {
                run += 1;
                row -= 1;
            }
            assert!(
                (run as f64 - h).abs() <= 2.0,
                "the PNG bar at x {column} is {run} px tall, the SVG's {h}"
            );
        }
    }
}

/// A grouped bar chart written as `<stem>.svg` and `<stem>.png` shows `table`'s `value`
/// per `group`, in both files.
fn check_bar_chart(stem: &Path, table: &Csv, group: &str, value: &str) {
    let svg = std::fs::read_to_string(stem.with_extension("svg")).unwrap();
    let values = table.grouped(group, value);
    let bars = bars_of(&svg, values.len(), true);
    bars_follow(&bars, &values).unwrap_or_else(|e| panic!("{}: {e}", stem.display()));
    // the check tells a wrong order apart whenever it moves a value by more than 0.05
    let mut reversed = values.clone();
    reversed.iter_mut().for_each(|v| v.reverse());
    let differs = values
        .iter()
        .zip(&reversed)
        .any(|(a, b)| a.iter().zip(b).any(|(x, y)| (x - y).abs() > 0.05));
    if differs {
        assert!(
            bars_follow(&bars, &reversed).is_err(),
            "{}: a reversed order passed",
            stem.display()
        );
    }
    png_bars_match(&picture(&stem.with_extension("png")), &bars);
}

#[test]
fn the_bar_check_fails_on_a_wrong_ordering_and_a_wrong_value() {
    let table = df!(
        "subset" => ["MMLU medical", "CMMLU medical", "MMLU-Pro medical", "MMLU medical", "CMMLU medical", "MMLU-Pro medical"],
        "model" => ["base", "base", "base", "tuned", "tuned", "tuned"],
        "accuracy" => [0.62, 0.41, 0.35, 0.66, 0.39, 0.44],
        "ci_low" => [0.52, 0.31, 0.25, 0.56, 0.29, 0.34],
        "ci_high" => [0.72, 0.51, 0.45, 0.76, 0.49, 0.54],
    )
    .unwrap();
    let plot = report::bars(&table, "subset", "accuracy", &BarOptions::default()).unwrap();
    let bars = bars_of(plot.svg(), 2, true);
    let right = vec![vec![0.62, 0.41, 0.35], vec![0.66, 0.39, 0.44]];
    bars_follow(&bars, &right).unwrap();
    let swapped = vec![vec![0.41, 0.62, 0.35], vec![0.66, 0.39, 0.44]];
    assert!(bars_follow(&bars, &swapped).is_err());
    let groups_swapped = vec![right[1].clone(), right[0].clone()];
    assert!(bars_follow(&bars, &groups_swapped).is_err());
    let off = vec![vec![0.62, 0.41, 0.30], vec![0.66, 0.39, 0.44]];
    assert!(bars_follow(&bars, &off).is_err());
    let missing = vec![vec![0.62, 0.41], vec![0.66, 0.39, 0.44]];
    assert!(bars_follow(&bars, &missing).is_err());

    // the PNG: decoded, and its bars as tall as the SVG's
    let image = decode_png(plot.png()).unwrap();
    assert_eq!((image.width as u32, image.height as u32), plot.dimensions());
    png_bars_match(&image, &bars);
    let mut corrupt = plot.png().to_vec();
    let idat = corrupt.windows(4).position(|w| w == b"IDAT").unwrap();
    corrupt[idat + 40] ^= 0x55;
    assert!(decode_png(&corrupt).unwrap_err().contains("CRC"));
}

// ---- the labs ----------------------------------------------------------------------------

#[test]
fn lab1_tokens_and_sampling_runs_and_charts_the_next_token_probabilities() {
    let dir = scratch("lab1");
    let model = tiny_model(&dir, "tiny-gemma3");
    let out = run(
        "scripts/workshop/lab1_tokens.rhai",
        &dir,
        &[
            format!("model={}", model.display()),
            "samples=2".into(),
            "max_tokens=4".into(),
            "k=5".into(),
        ],
    );
    let next = Csv::read(&out.join("next_tokens.csv"));
    next.has_columns(&["temperature", "rank", "token", "prob", "logprob"]);
    assert_eq!(next.rows.len(), 3 * 5, "k tokens at three temperatures");
    assert_eq!(
        next.distinct("temperature"),
        ["T = 0.5", "T = 1.0", "T = 1.5"]
    );
    for probs in next.grouped("temperature", "prob") {
        assert!(
            probs.windows(2).all(|p| p[0] >= p[1]),
            "most likely first: {probs:?}"
        );
    }
    // at T = 1 the probability is the model's own: exp(logprob)
    for row in next.rows.iter().filter(|r| r["temperature"] == "T = 1.0") {
        let (p, lp) = (Csv::number(row, "prob"), Csv::number(row, "logprob"));
        assert!((p - lp.exp()).abs() < 1e-9, "{p} vs exp({lp})");
    }
    check_bar_chart(&out.join("next_tokens"), &next, "temperature", "prob");

    let samples = Csv::read(&out.join("samples.csv"));
    samples.has_columns(&["setting", "sample", "completion"]);
    assert_eq!(samples.rows.len(), 4 * 2);
    let greedy: Vec<&String> = samples
        .rows
        .iter()
        .filter(|r| r["setting"].starts_with("greedy"))
        .map(|r| &r["completion"])
        .collect();
    assert_eq!(greedy[0], greedy[1], "greedy samples are the same");
    let scored = Csv::read(&out.join("logprobs.csv"));
    scored.has_columns(&["prompt", "completion", "tokens", "logprob", "prob"]);
    assert_eq!(scored.rows.len(), 8);
    assert!(scored.rows.iter().all(|r| Csv::number(r, "logprob") < 0.0));
}

#[test]
fn lab2_rewards_scores_the_examples_as_the_study_does_and_charts_them() {
    let dir = scratch("lab2");
    let model = tiny_model(&dir, "tiny-gemma3");
    let out = run(
        "scripts/workshop/lab2_rewards.rhai",
        &dir,
        &[
            format!("model={}", model.display()),
            "questions=2".into(),
            "samples=2".into(),
            "max_tokens=6".into(),
        ],
    );
    let rewards = Csv::read(&out.join("rewards.csv"));
    rewards.has_columns(&[
        "example",
        "accuracy",
        "format",
        "xmlcount",
        "total",
        "binary",
        "completion",
    ]);
    let score = |example: &str| -> [f64; 4] {
        let row = rewards
            .rows
            .iter()
            .find(|r| r["example"] == example)
            .unwrap();
        ["accuracy", "format", "xmlcount", "total"].map(|c| Csv::number(row, c))
    };
    assert_eq!(score("right, well formatted"), [2.0, 2.0, 1.0, 5.0]);
    assert_eq!(score("right, answer text"), [1.0, 2.0, 1.0, 4.0]);
    assert_eq!(score("wrong letter"), [0.0, 2.0, 1.0, 3.0]);
    assert_eq!(score("right, no <think>"), [2.0, 0.0, 0.5, 2.5]);
    assert_eq!(score("right, text after it"), [2.0, 1.0, 1.0, 4.0]);
    assert_eq!(score("tags twice"), [2.0, 2.0, 0.5, 4.5]);
    assert_eq!(score("no tags"), [0.0, 0.0, 0.0, 0.0]);

    // the chart is drawn from the long form of the same table: one bar per example and reward
    let svg = std::fs::read_to_string(out.join("rewards.svg")).unwrap();
    let values: Vec<Vec<f64>> = ["accuracy", "format", "xmlcount"]
        .iter()
        .map(|c| rewards.rows.iter().map(|r| Csv::number(r, c)).collect())
        .collect();
    let bars = bars_of(&svg, 3, true);
    bars_follow(&bars, &values).unwrap();
    png_bars_match(&picture(&out.join("rewards.png")), &bars);

    let answers = Csv::read(&out.join("model_answers.csv"));
    answers.has_columns(&[
        "id",
        "sample",
        "reward",
        "accuracy",
        "format",
        "xmlcount",
        "own",
        "judge_correct",
        "judge_format_ok",
        "completion",
    ]);
    assert_eq!(answers.rows.len(), 2 * 2);
    for row in &answers.rows {
        let total = Csv::number(row, "accuracy")
            + Csv::number(row, "format")
            + Csv::number(row, "xmlcount");
        assert!((Csv::number(row, "reward") - total).abs() < 1e-9);
        // the judge's format check is the soft pattern, the first point of `format`
        assert_eq!(
            row["judge_format_ok"] == "true",
            Csv::number(row, "format") >= 1.0,
            "{row:?}"
        );
    }
}

#[test]
fn lab3_grpo_trains_the_toy_task_and_medqa_and_draws_the_curves() {
    let dir = scratch("lab3");
    let model = tiny_model(&dir, "tiny-gemma3");
    let out = run(
        "scripts/workshop/lab3_grpo.rhai",
        &dir,
        &[
            format!("model={}", model.display()),
            "toy_questions=4".into(),
            "toy_steps=2".into(),
            "toy_max_tokens=4".into(),
            "medqa_questions=2".into(),
            "medqa_steps=1".into(),
            "medqa_max_tokens=4".into(),
            "warmup_steps=1".into(),
            "group=2".into(),
        ],
    );
    let toy = Csv::read(&out.join("toy_metrics.csv"));
    toy.has_columns(&[
        "step",
        "reward",
        "reward_exact",
        "frac_zero_std",
        "kl",
        "completion_len",
    ]);
    assert_eq!(toy.distinct("step"), ["1", "2"]);
    let medqa = Csv::read(&out.join("medqa_metrics.csv"));
    medqa.has_columns(&[
        "step",
        "reward",
        "reward_accuracy",
        "reward_format",
        "reward_xmlcount",
    ]);
    assert_eq!(medqa.rows.len(), 1);
    picture(&out.join("toy_curves.png"));
    picture(&out.join("medqa_curves.png"));
    assert!(out
        .join("adapter-medqa/adapter_model.safetensors")
        .is_file());
    let toy_items = std::fs::read_to_string(out.join("toy.jsonl")).unwrap();
    assert_eq!(toy_items.lines().count(), 4);
    assert!(toy_items.lines().next().unwrap().contains("What is 4 + 5?"));
}

#[test]
fn lab4_eval_summarises_compares_and_charts() {
    let dir = scratch("lab4");
    let model = tiny_model(&dir, "tiny-gemma3");
    let out = run(
        "scripts/workshop/lab4_eval.rhai",
        &dir,
        &[
            format!("model={}", model.display()),
            r#"subjects=["anatomy", "clinical_knowledge", "astronomy", "philosophy", "sociology", "marketing"]"#.into(),
            "per_subject=2".into(),
            "medical_extra=1".into(),
        ],
    );
    let results = Csv::read(&out.join("results.csv"));
    results.has_columns(&["id", "model", "subject", "category", "pred", "correct"]);
    assert_eq!(results.rows.len(), 2 * (4 * 2 + 2 * 3));
    let by_category = Csv::read(&out.join("by_category.csv"));
    by_category.has_columns(&["model", "category", "n", "accuracy", "ci_low", "ci_high"]);
    assert_eq!(by_category.distinct("model"), ["0-shot", "1-shot"]);
    for row in &by_category.rows {
        let (lo, acc, hi) = (
            Csv::number(row, "ci_low"),
            Csv::number(row, "accuracy"),
            Csv::number(row, "ci_high"),
        );
        assert!(lo <= acc && acc <= hi, "{row:?}");
    }
    let compared = Csv::read(&out.join("compare.csv"));
    compared.has_columns(&["category", "model", "diff", "p_value", "test"]);
    assert!(compared
        .rows
        .iter()
        .any(|r| r["model"] == "1-shot" && r["test"] == "mcnemar"));

    // the chart holds the four categories' rows of the summary
    let four: Vec<BTreeMap<String, String>> = by_category
        .rows
        .iter()
        .filter(|r| {
            ["stem", "humanities", "social_sciences", "other"].contains(&r["category"].as_str())
        })
        .cloned()
        .collect();
    assert_eq!(four.len(), 2 * 4);
    let categories = Csv {
        columns: by_category.columns.clone(),
        rows: four,
    };
    check_bar_chart(&out.join("by_category"), &categories, "model", "accuracy");
    check_bar_chart(
        &out.join("medical_subjects"),
        &Csv::read(&out.join("medical_subjects.csv")),
        "model",
        "accuracy",
    );
    picture(&out.join("by_category_radar.png"));
}

// ---- the study ---------------------------------------------------------------------------

/// `rlvr serve` on the tiny fixture, as an OpenAI-compatible judge; killed when dropped.
struct Served(std::process::Child, String);

impl Served {
    fn start(model: &Path) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rlvr"))
            .args([
                "serve",
                "--port",
                "0",
                "--served-model-name",
                "tiny-served",
                // the tiny fixture's context is 128 tokens; the study's prompts are longer
                "--max-model-len",
                "4096",
                "--model",
            ])
            .arg(model)
            .current_dir(repo(""))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut first = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut first,
        )
        .unwrap();
        let url = first
            .strip_prefix("listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("rlvr serve did not start: {first:?}"))
            .to_string();
        Served(child, url)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_study_runs_end_to_end_with_a_local_and_a_served_judge() {
    let dir = scratch("open-medical-r1");
    let base = tiny_model(&dir, "tiny-gemma3");
    let local_judge = tiny_model(&dir, "tiny-qwen2");
    let server = Served::start(&base);
    let out = run(
        "scripts/open_medical_r1.rhai",
        &dir,
        &[
            format!("base={}", base.display()),
            format!(r#"judges=["{}", "{}#tiny-served"]"#, local_judge.display(), server.1),
            "pool_size=6".into(),
            "train=3".into(),
            "hard=3".into(),
            "judge_max_tokens=4".into(),
            "steps=1".into(),
            "group=2".into(),
            "batch=2".into(),
            "grad_accum=1".into(),
            "max_tokens=4".into(),
            "per_subject=1".into(),
            r#"subjects=#{ mmlu: ["anatomy", "clinical_knowledge", "college_medicine", "astronomy", "philosophy", "sociology", "marketing"], cmmlu: ["anatomy", "genetics", "virology", "philosophy"], mmlu_pro: ["health", "law", "biology"] }"#.into(),
            "shots=0".into(),
            "eval_max_tokens=4".into(),
        ],
    );
    drop(server);
    let strategies = [
        "random",
        "self-filtered",
        "tiny-qwen2-filtered",
        "tiny-served-filtered",
    ];
    let models: Vec<&str> = std::iter::once("base").chain(strategies).collect();

    let pass_rates = Csv::read(&out.join("pass_rates.csv"));
    pass_rates.has_columns(&["filter", "id", "pass_rate"]);
    assert_eq!(
        pass_rates.distinct("filter"),
        ["self", "tiny-qwen2", "tiny-served"]
    );
    assert_eq!(pass_rates.rows.len(), 3 * 6);
    let sets = Csv::read(&out.join("training_sets.csv"));
    assert_eq!(sets.distinct("strategy"), strategies);
    assert_eq!(sets.rows.len(), 4 * 3);
    let metrics = Csv::read(&out.join("training_metrics.csv"));
    metrics.has_columns(&[
        "strategy",
        "step",
        "reward",
        "reward_accuracy",
        "reward_format",
        "reward_xmlcount",
        "kl",
    ]);
    assert_eq!(metrics.distinct("strategy"), strategies);
    for s in strategies {
        assert!(
            out.join(format!("adapter-{s}/adapter_model.safetensors"))
                .is_file(),
            "{s}"
        );
    }

    let by_category = Csv::read(&out.join("by_category.csv"));
    by_category.has_columns(&[
        "benchmark",
        "model",
        "category",
        "n",
        "accuracy",
        "ci_low",
        "ci_high",
    ]);
    assert_eq!(
        by_category.distinct("benchmark"),
        ["MMLU", "CMMLU", "MMLU-Pro", "GSM8K"]
    );
    assert_eq!(by_category.distinct("model"), models);
    let mmlu_categories: Vec<String> = by_category
        .rows
        .iter()
        .filter(|r| r["benchmark"] == "MMLU")
        .map(|r| r["category"].clone())
        .collect();
    for c in [
        "stem",
        "humanities",
        "social_sciences",
        "other",
        "all",
        "medical",
    ] {
        assert!(
            mmlu_categories.iter().any(|m| m == c),
            "MMLU has no {c} row"
        );
    }
    let compared = Csv::read(&out.join("compare.csv"));
    compared.has_columns(&[
        "benchmark",
        "category",
        "model",
        "accuracy",
        "diff",
        "diff_low",
        "diff_high",
        "p_value",
        "test",
    ]);
    for row in &compared.rows {
        if row["model"] == "base" {
            assert!(
                row["diff"].is_empty() && row["p_value"].is_empty(),
                "{row:?}"
            );
        } else {
            let p = Csv::number(row, "p_value");
            assert!(
                (0.0..=1.0).contains(&p) && row["test"] == "mcnemar",
                "{row:?}"
            );
        }
    }
    for benchmark in ["mmlu", "cmmlu", "mmlu_pro", "gsm8k"] {
        assert!(out.join(format!("results-{benchmark}.parquet")).is_file());
        picture(&out.join(format!("categories-{benchmark}.png")));
    }

    let medical = Csv::read(&out.join("medical.csv"));
    medical.has_columns(&["subset", "model", "n", "accuracy", "ci_low", "ci_high"]);
    assert_eq!(
        medical.distinct("subset"),
        ["MMLU medical", "CMMLU medical", "MMLU-Pro medical"]
    );
    assert_eq!(medical.distinct("model"), models);
    check_bar_chart(&out.join("medical"), &medical, "model", "accuracy");
    let overall = Csv::read(&out.join("overall.csv"));
    assert_eq!(overall.rows.len(), 4 * models.len());
    check_bar_chart(&out.join("overall"), &overall, "model", "accuracy");
    let subjects = Csv::read(&out.join("medical_subjects.csv"));
    assert!(subjects
        .distinct("subject")
        .contains(&"MMLU clinical knowledge".to_string()));
    assert!(subjects
        .distinct("subject")
        .contains(&"MMLU-Pro health".to_string()));
    check_bar_chart(
        &out.join("medical_subjects"),
        &subjects,
        "model",
        "accuracy",
    );
    for chart in [
        "medical_radar",
        "categories-mmlu-radar",
        "training_curves",
        "pass_rates",
    ] {
        picture(&out.join(format!("{chart}.png")));
    }
    let manifest = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    assert!(manifest.contains("\"status\": \"ok\""), "{manifest}");
    assert!(
        manifest.contains("stand-in"),
        "the sample pool is marked as a stand-in"
    );
}

#[test]
fn the_small_study_runs_several_seeds_with_a_warm_up_and_held_out_medqa() {
    let dir = scratch("open-medical-r1-seeds");
    let base = tiny_model(&dir, "tiny-gemma3");
    let judge = tiny_model(&dir, "tiny-qwen2");
    // the small study's configuration, shrunk to the tiny models
    let out = run(
        "scripts/open_medical_r1.rhai",
        &dir,
        &[
            "small=true".into(),
            format!("base={}", base.display()),
            format!(r#"judges=["{}"]"#, judge.display()),
            "pool_size=6".into(),
            "warmup=4".into(),
            "warmup_steps=1".into(),
            "train=3".into(),
            "hard=2".into(),
            "samples=2".into(),
            "judge_max_tokens=4".into(),
            "seeds=[1, 2]".into(),
            "steps=1".into(),
            "group=2".into(),
            "batch=2".into(),
            "max_tokens=4".into(),
            "per_subject=1".into(),
            "eval_max_tokens=4".into(),
        ],
    );
    let strategies = ["random", "self-filtered", "tiny-qwen2-filtered"];

    // a filter that finds too few easy questions fills its set with hard ones
    let sets = Csv::read(&out.join("training_sets.csv"));
    sets.has_columns(&["strategy", "seed", "id"]);
    assert_eq!(sets.rows.len(), 3 * 3 * 2);
    assert_eq!(sets.distinct("seed"), ["1", "2"]);
    let metrics = Csv::read(&out.join("training_metrics.csv"));
    assert_eq!(metrics.distinct("strategy"), strategies);
    assert_eq!(metrics.distinct("seed"), ["1", "2"]);
    for s in strategies {
        for seed in [1, 2] {
            assert!(out
                .join(format!("adapter-{s}-seed{seed}/adapter_model.safetensors"))
                .is_file());
        }
    }
    assert!(out
        .join("adapter-warmup/adapter_model.safetensors")
        .is_file());
    picture(&out.join("training_curves.png"));

    // MedQA is evaluated on rows neither in the pool nor in the warm-up (the last 4 rows)
    let pool: Vec<String> = Csv::read(&out.join("pass_rates.csv"))
        .rows
        .iter()
        .map(|r| r["id"].clone())
        .collect();
    assert_eq!(pool.len(), 2 * 6);
    let medqa = ParquetReader::new(std::fs::File::open(out.join("results-medqa.parquet")).unwrap())
        .finish()
        .unwrap();
    let ids: Vec<String> = medqa
        .column("id")
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .map(|v| v.unwrap().to_string())
        .collect();
    assert!(!ids.is_empty());
    for id in &ids {
        assert!(!pool.contains(id), "{id} is in the pool");
        let row: usize = id.rsplit('/').next().unwrap().parse().unwrap();
        assert!(row < 196, "{id} is a warm-up row");
    }

    // compare: a row per seed and a combined row per strategy, against the warm-up model
    let compared = Csv::read(&out.join("compare.csv"));
    compared.has_columns(&[
        "benchmark",
        "category",
        "model",
        "seed",
        "runs",
        "accuracy",
        "sd",
        "diff",
        "diff_sd",
        "better",
        "worse",
        "p_value",
        "test",
    ]);
    assert_eq!(
        compared.distinct("benchmark"),
        ["MMLU", "CMMLU", "MMLU-Pro", "GSM8K", "MedQA"]
    );
    assert_eq!(compared.distinct("model")[..2], ["warm-up", "base"]);
    for row in &compared.rows {
        let strategy = strategies.contains(&row["model"].as_str());
        match (strategy, row["seed"].is_empty()) {
            (false, _) => assert!(row["diff"].is_empty() || row["model"] == "base", "{row:?}"),
            (true, true) => {
                assert_eq!(row["test"], "stouffer", "{row:?}");
                assert_eq!(row["runs"], "2", "{row:?}");
                assert!((0.0..=1.0).contains(&Csv::number(row, "p_value")));
            }
            (true, false) => assert_eq!(row["test"], "mcnemar", "{row:?}"),
        }
    }
    // the charts hold one bar per model: the mean over seeds
    let by_category = Csv::read(&out.join("by_category.csv"));
    let models = by_category.distinct("model");
    assert_eq!(models.len(), 2 + strategies.len());
    let medical = Csv::read(&out.join("medical.csv"));
    check_bar_chart(&out.join("medical"), &medical, "model", "accuracy");
    for chart in ["medical_radar", "categories-mmlu-radar", "pass_rates"] {
        picture(&out.join(format!("{chart}.png")));
    }
    let manifest = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    assert!(manifest.contains("seconds per stage"), "{manifest}");
}

// ---- the script functions the labs added ------------------------------------------------------

#[test]
fn next_tokens_gives_the_models_distribution_as_the_sampler_sees_it() {
    let lm = LanguageModel::load(
        &repo("tests/fixtures/tiny-gemma3"),
        Some(&repo("tests/fixtures/tiny-tokenizer/tokenizer.json")),
        &Device::Cpu,
    )
    .unwrap();
    let prompt = "The patient";
    let ids = lm.tokenizer.encode(prompt).unwrap();
    let plain = lm.next_tokens(prompt, 512, 1.0, 1.0).unwrap();
    assert_eq!(plain.len(), 512, "the whole vocabulary when asked");
    assert!((plain.iter().map(|t| t.prob).sum::<f64>() - 1.0).abs() < 1e-6);
    assert!((plain.last().unwrap().cumulative - 1.0).abs() < 1e-6);
    for t in plain.iter().take(5) {
        let scored = lm.model.completion_logprobs(&ids, &[t.id], false).unwrap();
        let lp = scored.to_vec1::<f32>().unwrap()[0] as f64;
        assert!((lp - t.logprob).abs() < 1e-4, "{lp} vs {}", t.logprob);
        assert!((t.prob - t.logprob.exp()).abs() < 1e-9);
    }
    // greedy decoding takes the first; temperature sharpens, top-p cuts
    let first = lm.model.greedy(&ids, 1, false).unwrap()[0];
    assert_eq!(plain[0].id, first);
    let greedy = lm.next_tokens(prompt, 3, 0.0, 1.0).unwrap();
    assert_eq!(
        greedy.iter().map(|t| t.prob).collect::<Vec<_>>(),
        [1.0, 0.0, 0.0]
    );
    let sharp = lm.next_tokens(prompt, 1, 0.5, 1.0).unwrap();
    assert!(sharp[0].prob > plain[0].prob);
    let nucleus = lm.next_tokens(prompt, 512, 1.0, 0.3).unwrap();
    let kept = nucleus.iter().filter(|t| t.kept).count();
    assert!(nucleus[kept - 1].cumulative - nucleus[kept - 1].prob < 0.3);
    assert!(nucleus[kept - 1].cumulative >= 0.3);
    assert!(nucleus.iter().skip(kept).all(|t| !t.kept));
}
