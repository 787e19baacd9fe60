//! The cells run in this kernel session, for `history_request`: the last `n` (`tail`, a
//! console's up-arrow), a range of execution counts, or a glob search, read as IPython reads
//! them (an `n` left out or negative means no limit; `unique` keeps the latest of equal
//! inputs; `range` names a session, 0 or [`SESSION`] being this one).

use serde::Deserialize;

/// The session number history entries carry: the kernel keeps one session, from its start.
pub const SESSION: usize = 1;

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
    /// How many entries, the latest (tail, search); left out or negative: all.
    #[serde(default)]
    pub n: Option<i64>,
    /// The session (range): 0 or [`SESSION`] is this one, earlier ones have no entries.
    #[serde(default)]
    pub session: Option<i64>,
    /// First execution count (range).
    #[serde(default)]
    pub start: Option<i64>,
    /// One past the last execution count (range); left out: to the latest.
    #[serde(default)]
    pub stop: Option<i64>,
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

/// Fills in what a `history_request`'s content may leave out, as IPython reads it, so that
/// the protocol crate (which requires every field) reads it: `n` -1 (every entry),
/// `unique` false, a range's `start` 0 and `stop` past the latest, `output` false, `raw`
/// true.
pub fn complete(content: &mut serde_json::Value) {
    let Some(fields) = content.as_object_mut() else {
        return;
    };
    let kind = fields
        .get("hist_access_type")
        .and_then(|k| k.as_str())
        .unwrap_or("");
    let defaults: &[(&str, serde_json::Value)] = match kind {
        "tail" => &[("n", (-1).into())],
        "search" => &[
            ("n", (-1).into()),
            ("unique", false.into()),
            ("pattern", "*".into()),
        ],
        "range" => &[("start", 0.into()), ("stop", i32::MAX.into())],
        _ => &[],
    };
    for (key, value) in defaults
        .iter()
        .chain(&[("output", false.into()), ("raw", true.into())])
    {
        if fields.get(*key).is_none_or(|v| v.is_null()) {
            fields.insert(key.to_string(), value.clone());
        }
    }
}

impl Query {
    /// The query of a request as the protocol crate read it.
    pub fn of(request: &jupyter_protocol::HistoryRequest) -> serde_json::Result<Query> {
        serde_json::from_value(serde_json::to_value(request)?)
    }
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
            "range" if !this_session(query.session) => Vec::new(),
            "range" => {
                let start = query.start.unwrap_or(0);
                let stop = query.stop.unwrap_or(i64::MAX);
                self.entries
                    .iter()
                    .filter(|e| (start..stop).contains(&(e.count as i64)))
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

/// Whether a range request's `session` is this kernel's: 0 (IPython's "the current one"),
/// left out, or [`SESSION`].
fn this_session(session: Option<i64>) -> bool {
    matches!(session, None | Some(0)) || session == Some(SESSION as i64)
}

/// The last `n` of `entries`; all of them when `n` is left out or negative.
fn last(mut entries: Vec<&Entry>, n: Option<i64>) -> Vec<&Entry> {
    if let Some(n) = n.and_then(|n| usize::try_from(n).ok()) {
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
    fn a_search_without_n_or_unique_is_completed_and_then_parses() {
        let mut content = serde_json::json!({
            "hist_access_type": "search", "pattern": "6*", "output": false, "raw": true
        });
        complete(&mut content);
        assert_eq!(content["n"], -1);
        assert_eq!(content["unique"], false);
        assert_eq!(content["pattern"], "6*", "what the client sent is kept");
        let parsed = jupyter_protocol::JupyterMessageContent::from_type_and_content(
            "history_request",
            content,
        )
        .unwrap();
        let jupyter_protocol::JupyterMessageContent::HistoryRequest(request) = parsed else {
            panic!("not a history request: {parsed:?}");
        };
        let h = history(&CELLS);
        assert_eq!(
            inputs(h.query(&Query::of(&request).unwrap())),
            ["6*7", "6*7", "6*7"]
        );
        let mut tail = serde_json::json!({ "hist_access_type": "tail" });
        complete(&mut tail);
        assert_eq!(
            (tail["n"].clone(), tail["raw"].clone()),
            (serde_json::json!(-1), serde_json::json!(true))
        );
        let mut range =
            serde_json::json!({ "hist_access_type": "range", "session": 0, "start": 2 });
        complete(&mut range);
        assert_eq!(
            (range["start"].clone(), range["stop"].clone()),
            (serde_json::json!(2), serde_json::json!(i32::MAX))
        );
    }

    const CELLS: [&str; 6] = ["6*7", "[1].len()", "6*7", "let x = 6;", "6*7", "x"];

    #[test]
    fn tail_is_the_latest_n_and_all_without_n() {
        let h = history(&CELLS);
        let tail = |json| inputs(h.query(&query(json)));
        assert_eq!(
            tail(serde_json::json!({"hist_access_type": "tail", "n": 2})),
            ["6*7", "x"]
        );
        assert_eq!(
            tail(serde_json::json!({"hist_access_type": "tail", "n": 0})),
            Vec::<&str>::new()
        );
        assert_eq!(
            tail(serde_json::json!({"hist_access_type": "tail", "n": 99})),
            CELLS
        );
        assert_eq!(tail(serde_json::json!({"hist_access_type": "tail"})), CELLS);
        assert_eq!(
            tail(serde_json::json!({"hist_access_type": "tail", "n": -1})),
            CELLS
        );
    }

    #[test]
    fn range_is_by_execution_count_in_this_session() {
        let h = history(&CELLS);
        let range = |json| inputs(h.query(&query(json)));
        let two = ["[1].len()", "6*7"];
        assert_eq!(
            range(serde_json::json!({"hist_access_type": "range", "start": 2, "stop": 4})),
            two
        );
        for session in [0, SESSION as i64] {
            assert_eq!(
                range(
                    serde_json::json!({"hist_access_type": "range", "session": session, "start": 2, "stop": 4})
                ),
                two
            );
        }
        for other in [-1, 2] {
            assert!(range(
                serde_json::json!({"hist_access_type": "range", "session": other, "start": 2, "stop": 4})
            )
            .is_empty());
        }
        assert_eq!(
            range(serde_json::json!({"hist_access_type": "range", "session": 0, "start": 5})),
            ["6*7", "x"]
        );
    }

    #[test]
    fn search_matches_globs_keeps_the_latest_unique_and_all_without_n() {
        let h = history(&CELLS);
        let search = |json| h.query(&query(json));
        let all = search(serde_json::json!({"hist_access_type": "search", "pattern": "6*"}));
        assert_eq!(all.iter().map(|e| e.count).collect::<Vec<_>>(), [1, 3, 5]);
        let unique = search(
            serde_json::json!({"hist_access_type": "search", "pattern": "6*", "unique": true}),
        );
        assert_eq!(unique.iter().map(|e| e.count).collect::<Vec<_>>(), [5]);
        let unique_all = search(
            serde_json::json!({"hist_access_type": "search", "pattern": "*", "unique": true}),
        );
        assert_eq!(inputs(unique_all), ["[1].len()", "let x = 6;", "6*7", "x"]);
        let unique_two = search(
            serde_json::json!({"hist_access_type": "search", "pattern": "*", "unique": true, "n": 2}),
        );
        assert_eq!(inputs(unique_two), ["6*7", "x"]);
        let two =
            search(serde_json::json!({"hist_access_type": "search", "pattern": "*6*", "n": 2}));
        assert_eq!(inputs(two), ["let x = 6;", "6*7"]);
        let at_least_two =
            search(serde_json::json!({"hist_access_type": "search", "pattern": "?*?"}));
        assert_eq!(at_least_two.len(), 5);
        let exact = search(serde_json::json!({"hist_access_type": "search", "pattern": "x"}));
        assert_eq!(inputs(exact), ["x"]);
    }

    #[test]
    fn requests_as_the_protocol_crate_reads_them() {
        use jupyter_protocol::HistoryRequest;
        let h = history(&CELLS);
        let search = HistoryRequest::Search {
            pattern: "6*".into(),
            unique: false,
            output: false,
            raw: true,
            n: -1,
        };
        assert_eq!(h.query(&Query::of(&search).unwrap()).len(), 3);
        let tail = HistoryRequest::Tail {
            n: 1,
            output: true,
            raw: true,
        };
        let query = Query::of(&tail).unwrap();
        assert!(query.output);
        assert_eq!(inputs(h.query(&query)), ["x"]);
        let range = HistoryRequest::Range {
            session: Some(-1),
            start: 1,
            stop: 3,
            output: false,
            raw: true,
        };
        assert!(h.query(&Query::of(&range).unwrap()).is_empty());
    }
}
