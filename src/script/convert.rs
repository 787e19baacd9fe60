//! Conversions between Rhai values and library arguments, with errors that name the
//! option at fault.

use rhai::{Array, Dynamic, EvalAltResult, Map};

/// The result type of every script binding.
pub type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

/// A library error as a script error.
pub fn error(e: impl std::fmt::Display) -> Box<EvalAltResult> {
    e.to_string().into()
}

/// Fails on a key of `map` that is not in `allowed`, naming the function and listing the
/// keys it takes (a typo in an option name never passes silently).
pub fn check_keys(map: &Map, allowed: &[&str], function: &str) -> RhaiResult<()> {
    for key in map.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(error(format!(
                "{function}: unknown option `{key}`; it takes {}",
                allowed.join(", ")
            )));
        }
    }
    Ok(())
}

/// An optional text option.
pub fn text(map: &Map, key: &str) -> RhaiResult<Option<String>> {
    match map.get(key) {
        None => Ok(None),
        Some(v) if v.is_unit() => Ok(None),
        Some(v) => v
            .clone()
            .into_string()
            .map(Some)
            .map_err(|t| error(format!("option `{key}` must be a string, not {t}"))),
    }
}

/// An optional list-of-text option: an array of strings, or one string.
pub fn text_list(map: &Map, key: &str) -> RhaiResult<Option<Vec<String>>> {
    match map.get(key) {
        None => Ok(None),
        Some(v) if v.is_unit() => Ok(None),
        Some(v) if v.is_string() => Ok(Some(vec![v.clone().into_string().map_err(error)?])),
        Some(v) => match v.clone().try_cast::<Array>() {
            Some(items) => strings(items, key).map(Some),
            None => Err(error(format!(
                "option `{key}` must be a string or an array of strings, not {}",
                v.type_name()
            ))),
        },
    }
}

/// The strings of an array, failing on anything else.
pub fn strings(items: Array, what: &str) -> RhaiResult<Vec<String>> {
    items
        .into_iter()
        .map(|item| {
            item.into_string()
                .map_err(|t| error(format!("`{what}` must hold strings, not {t}")))
        })
        .collect()
}

/// A non-negative count or index.
pub fn count(value: i64, what: &str) -> RhaiResult<usize> {
    usize::try_from(value).map_err(|_| error(format!("`{what}` must be 0 or more, not {value}")))
}

/// A value from `serde_json` as a Rhai value.
pub fn from_json(value: serde_json::Value) -> Dynamic {
    match value {
        serde_json::Value::Null => Dynamic::UNIT,
        serde_json::Value::Bool(b) => b.into(),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => i.into(),
            None => n.as_f64().unwrap_or(f64::NAN).into(),
        },
        serde_json::Value::String(s) => s.into(),
        serde_json::Value::Array(items) => {
            Dynamic::from_array(items.into_iter().map(from_json).collect())
        }
        serde_json::Value::Object(fields) => Dynamic::from_map(
            fields
                .into_iter()
                .map(|(k, v)| (k.into(), from_json(v)))
                .collect(),
        ),
    }
}

/// A Rhai value as JSON (maps, arrays, strings, numbers, booleans; anything else as text).
pub fn to_json(value: &Dynamic) -> serde_json::Value {
    if value.is_unit() {
        serde_json::Value::Null
    } else if let Ok(b) = value.as_bool() {
        b.into()
    } else if let Ok(i) = value.as_int() {
        i.into()
    } else if let Ok(f) = value.as_float() {
        serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, serde_json::Value::Number)
    } else if let Some(items) = value.clone().try_cast::<Array>() {
        items.iter().map(to_json).collect()
    } else if let Some(map) = value.clone().try_cast::<Map>() {
        map.iter()
            .map(|(k, v)| (k.to_string(), to_json(v)))
            .collect()
    } else {
        value.to_string().into()
    }
}
