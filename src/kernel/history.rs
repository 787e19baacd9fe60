//! The cells run in this kernel session, for `history_request`: the last `n` (`tail`, a
//! console's up-arrow), a range of execution counts, or a glob search.

use serde::Deserialize;

/// One history entry: the execution count, the cell's code, the text of its result.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The cell's execution count.
    pub count: usize,
    /// Its code.
    pub input: String,
    /// The `text/plain` of its result (empty when it had none).
    pub output: String,
}

/// The cells of this session, oldest first.
#[derive(Debug, Default)]
pub struct History {
    entries: Vec<Entry>,
}

/// A `history_request`'s content, read leniently (clients leave out what they do not use).
#[derive(Debug, Deserialize)]
pub struct Query {
    /// `tail`, `range` or `search`.
    pub hist_access_type: String,
    /// How many entries (tail, search).
    #[serde(default)]
    pub n: Option<usize>,
    /// First execution count (range).
    #[serde(default)]
    pub start: Option<usize>,
    /// One past the last execution count (range).
    #[serde(default)]
    pub stop: Option<usize>,
    /// Glob pattern (search): `*` any text, `?` one character.
    #[serde(default)]
    pub pattern: Option<String>,
    /// Keep only the latest of equal inputs (search).
    #[serde(default)]
    pub unique: bool,
    /// Include outputs.
    #[serde(default)]
    pub output: bool,
}

impl History {
    /// Records a cell.
    pub fn push(&mut self, entry: Entry) {
        self.entries.push(entry);
    }

    /// The entries `query` asks for, oldest first.
    pub fn query(&self, query: &Query) -> Vec<&Entry> {
        match query.hist_access_type.as_str() {
            "tail" => last(self.entries.iter().collect(), query.n),
            "range" => {
                let start = query.start.unwrap_or(0);
                let stop = query.stop.unwrap_or(usize::MAX);
                self.entries
                    .iter()
                    .filter(|e| e.count >= start && e.count < stop)
                    .collect()
            }
            "search" => {
                let pattern: Vec<char> = query.pattern.as_deref().unwrap_or("*").chars().collect();
                let mut found: Vec<&Entry> = self
                    .entries
                    .iter()
                    .filter(|e| glob(&pattern, &e.input.chars().collect::<Vec<_>>()))
                    .collect();
                if query.unique {
                    let mut seen = std::collections::HashSet::new();
                    found.reverse();
                    found.retain(|e| seen.insert(e.input.as_str()));
                    found.reverse();
                }
                last(found, query.n)
            }
            _ => Vec::new(),
        }
    }
}

fn last(mut entries: Vec<&Entry>, n: Option<usize>) -> Vec<&Entry> {
    if let Some(n) = n {
        let skip = entries.len().saturating_sub(n);
        entries.drain(..skip);
    }
    entries
}

/// Whether `text` matches the whole glob `pattern` (`*` any run, `?` one character).
fn glob(pattern: &[char], text: &[char]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some(('*', rest)) => (0..=text.len()).any(|i| glob(rest, &text[i..])),
        Some(('?', rest)) => !text.is_empty() && glob(rest, &text[1..]),
        Some((c, rest)) => text.first() == Some(c) && glob(rest, &text[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(inputs: &[&str]) -> History {
        let mut h = History::default();
        for (i, input) in inputs.iter().enumerate() {
            h.push(Entry {
                count: i + 1,
                input: input.to_string(),
                output: String::new(),
            });
        }
        h
    }

    fn query(json: serde_json::Value) -> Query {
        serde_json::from_value(json).unwrap()
    }

    fn inputs(entries: Vec<&Entry>) -> Vec<&str> {
        entries.iter().map(|e| e.input.as_str()).collect()
    }

    #[test]
    fn tail_range_and_search() {
        let h = history(&["6*7", "[1].len()", "6*7", "let x = 6;", "6*7"]);
        let tail = h.query(&query(
            serde_json::json!({"hist_access_type": "tail", "n": 2}),
        ));
        assert_eq!(inputs(tail), ["let x = 6;", "6*7"]);
        let range = h.query(&query(
            serde_json::json!({"hist_access_type": "range", "start": 2, "stop": 4}),
        ));
        assert_eq!(inputs(range), ["[1].len()", "6*7"]);
        let all = h.query(&query(
            serde_json::json!({"hist_access_type": "search", "pattern": "6*"}),
        ));
        assert_eq!(all.len(), 3);
        let unique = h.query(&query(
            serde_json::json!({"hist_access_type": "search", "pattern": "6*", "unique": true}),
        ));
        assert_eq!(unique.len(), 1);
        assert_eq!(unique[0].count, 5);
        let two = h.query(&query(
            serde_json::json!({"hist_access_type": "search", "pattern": "*6*", "n": 2}),
        ));
        assert_eq!(inputs(two), ["let x = 6;", "6*7"]);
        let one_char = h.query(&query(
            serde_json::json!({"hist_access_type": "search", "pattern": "?*?"}),
        ));
        assert_eq!(one_char.len(), 5);
    }
}
