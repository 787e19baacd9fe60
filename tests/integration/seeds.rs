//! Several seeds per strategy through a script (`tests/scripts/seeds.rhai`): `compare` with
//! `seeds: true` gives a row per seed and a combined row (checked in the script against
//! numbers worked out by hand), and `plot_curves` with `band` draws each strategy as one
//! mean line over a shaded band.

use crate::rlvr;

/// The fill colour and opacity of every `<polygon>` in an SVG document, in drawing order.
fn polygons(svg: &str) -> Vec<(String, String)> {
    svg.split("<polygon")
        .skip(1)
        .map(|p| {
            let attr = |name: &str| -> String {
                let key = format!(" {name}=\"");
                match p.find(&key) {
                    Some(start) => {
                        let rest = &p[start + key.len()..];
                        rest[..rest.find('"').unwrap()].to_string()
                    }
                    None => String::new(),
                }
            };
            (attr("fill"), attr("opacity"))
        })
        .collect()
}

#[test]
fn seeds_are_compared_and_drawn_as_bands_from_a_script() {
    let dir = std::env::temp_dir().join(format!("rlvr-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let output = rlvr(&["run", "tests/scripts/seeds.rhai", "--quiet", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("compared 18 rows"), "{stdout}");
    let compared = std::fs::read_to_string(dir.join("compare.csv")).unwrap();
    let header = compared.lines().next().unwrap();
    assert_eq!(
        header,
        "dataset,model,seed,runs,n,accuracy,sd,ci_low,ci_high,diff,diff_sd,better,worse,p_value,test"
    );

    let svg = std::fs::read_to_string(dir.join("band.svg")).unwrap();
    let blue = "#4E79A7";
    let orange = "#F28E2B";
    // one translucent band per strategy, drawn before (under) the lines
    let bands = polygons(&svg);
    assert_eq!(
        bands,
        [
            (blue.to_string(), "0.2".to_string()),
            (orange.to_string(), "0.2".to_string())
        ],
        "{bands:?}"
    );
    let first_line = [blue, orange]
        .iter()
        .filter_map(|c| svg.find(&format!("stroke=\"{c}\"")))
        .min()
        .unwrap();
    assert!(svg.rfind("<polygon").unwrap() < first_line);
    // a faint mean of the raw values and the smoothed mean, per strategy
    for color in [blue, orange] {
        let lines = svg
            .split("<polyline")
            .skip(1)
            .filter(|p| p.contains(&format!("stroke=\"{color}\"")))
            .count();
        assert_eq!(lines, 2, "{color}");
    }
    assert!(svg.contains("random (mean ± sd of 3 runs)"));
    assert!(svg.contains("filtered (mean ± sd of 3 runs)"));
    let png = std::fs::read(dir.join("band.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
}
