//! Where rlvr keeps its files: `$RLVR_HOME`, by default `~/.cache/rlvr`.

use std::path::PathBuf;

/// The project's home folder: `$RLVR_HOME` when set, else `~/.cache/rlvr`.
pub fn rlvr_home() -> PathBuf {
    if let Some(home) = std::env::var_os("RLVR_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    let user_home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    user_home.join(".cache").join("rlvr")
}
