//! Using rlvr-lab as a Rust library: load two of the study's datasets, take a seeded
//! sample, and count questions per category with SQL.
//!
//! Run from the repository root: `cargo run --example load_datasets`

use std::path::Path;

use rlvr::data::{self, table, LoadOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    rlvr::runtime::init();
    let options = LoadOptions::default();
    let mmlu = data::load("mmlu", Path::new("data/samples/mmlu"), &options)?;
    let medqa = data::load("medqa", Path::new("data/samples/medqa"), &options)?;
    let both = table::concat(&[mmlu, medqa])?;
    println!("{} questions", both.height());

    let pool = table::sample(&both, 100, 42)?;
    let counts = table::sql(
        &pool,
        "SELECT dataset, category, count(*) AS n FROM self GROUP BY dataset, category ORDER BY n DESC",
    )?;
    println!("{counts}");
    Ok(())
}
