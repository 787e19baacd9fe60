//! Reading chart data out of a table: columns looked up by name, with errors that name the
//! column at fault.

use polars::prelude::{Column, DataFrame, DataType};

use super::PlotError;

/// The column `name`, or an error listing the columns the table has.
pub fn column<'a>(df: &'a DataFrame, name: &str) -> Result<&'a Column, PlotError> {
    df.column(name).map_err(|_| PlotError::MissingColumn {
        column: name.to_string(),
        available: df
            .get_column_names()
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Whether the table has a column `name`.
pub fn has(df: &DataFrame, name: &str) -> bool {
    df.column(name).is_ok()
}

/// The numbers of column `name`; nulls and NaN become `None`. Booleans count as 0 and 1.
pub fn numbers(df: &DataFrame, name: &str) -> Result<Vec<Option<f64>>, PlotError> {
    let column = column(df, name)?;
    let dtype = column.dtype();
    if !(dtype.is_primitive_numeric() || dtype.is_bool() || dtype.is_null()) {
        return Err(PlotError::NotNumeric {
            column: name.to_string(),
            dtype: dtype.to_string(),
        });
    }
    let floats = column
        .cast(&DataType::Float64)
        .map_err(|e| PlotError::NotNumeric {
            column: name.to_string(),
            dtype: format!("{dtype} ({e})"),
        })?;
    let floats = floats.f64().map_err(|e| PlotError::NotNumeric {
        column: name.to_string(),
        dtype: format!("{dtype} ({e})"),
    })?;
    Ok(floats.iter().map(|v| v.filter(|x| x.is_finite())).collect())
}

/// The values of column `name` as text (numbers printed as polars prints them); nulls
/// become `"null"`.
pub fn labels(df: &DataFrame, name: &str) -> Result<Vec<String>, PlotError> {
    let column = column(df, name)?;
    let text = column
        .cast(&DataType::String)
        .map_err(|e| PlotError::Option {
            option: name.to_string(),
            message: format!("cannot read the column as labels: {e}"),
        })?;
    let text = text.str().map_err(|e| PlotError::Option {
        option: name.to_string(),
        message: format!("cannot read the column as labels: {e}"),
    })?;
    Ok(text
        .iter()
        .map(|v| v.unwrap_or("null").to_string())
        .collect())
}

/// The distinct values of `labels`, in order of first appearance.
pub fn distinct(labels: &[String]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    labels
        .iter()
        .filter(|l| seen.insert(l.as_str()))
        .cloned()
        .collect()
}

/// Fails when the table has no rows.
pub fn not_empty(df: &DataFrame) -> Result<(), PlotError> {
    if df.height() == 0 {
        Err(PlotError::Empty)
    } else {
        Ok(())
    }
}
