//! `rlvr kernel install`: writes the kernelspec (`kernel.json` and the logos) where Jupyter
//! looks for kernels, as `jupyter kernelspec install` would.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

/// The kernelspec's name: the folder under `kernels/` and what `jupyter kernelspec list`
/// shows.
pub const KERNEL_NAME: &str = "rhai";

/// The name notebooks show for the kernel.
pub const DISPLAY_NAME: &str = "Rhai (rlvr)";

const LOGO_32: &[u8] = include_bytes!("../kernelspec/logo-32x32.png");
const LOGO_64: &[u8] = include_bytes!("../kernelspec/logo-64x64.png");
const LOGO_SVG: &[u8] = include_bytes!("../kernelspec/logo-svg.svg");

/// Where the kernelspec goes, with the meanings of `jupyter kernelspec install`'s flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// The user's Jupyter data folder: `$JUPYTER_DATA_DIR`, else `$XDG_DATA_HOME/jupyter`,
    /// else `~/.local/share/jupyter` (`~/Library/Jupyter` on macOS, `%APPDATA%\jupyter` on
    /// Windows).
    User,
    /// The active Python environment: `$VIRTUAL_ENV`, `$CONDA_PREFIX`, or `python3`'s
    /// `sys.prefix`, under `share/jupyter`.
    SysPrefix,
    /// `PREFIX/share/jupyter`.
    Prefix(PathBuf),
}

impl Location {
    /// The Jupyter data folder this location stands for (the one holding `kernels/`).
    pub fn data_dir(&self) -> Result<PathBuf> {
        match self {
            Location::User => user_data_dir(),
            Location::SysPrefix => Ok(python_prefix()?.join("share").join("jupyter")),
            Location::Prefix(prefix) => Ok(prefix.join("share").join("jupyter")),
        }
    }
}

/// The kernelspec's `kernel.json` for the binary at `exe`: Jupyter starts
/// `exe kernel --connection-file FILE` and interrupts it with an `interrupt_request` message.
pub fn kernel_json(exe: &Path) -> serde_json::Value {
    json!({
        "argv": [exe.to_string_lossy(), "kernel", "--connection-file", "{connection_file}"],
        "display_name": DISPLAY_NAME,
        "language": "rhai",
        "interrupt_mode": "message",
        "metadata": { "debugger": false },
    })
}

/// Writes the kernelspec for the binary at `exe` into `location` and returns its folder.
pub fn install(location: &Location, exe: &Path) -> Result<PathBuf> {
    let dir = location.data_dir()?.join("kernels").join(KERNEL_NAME);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let spec = serde_json::to_string_pretty(&kernel_json(exe))?;
    for (name, bytes) in [
        ("kernel.json", spec.as_bytes()),
        ("logo-32x32.png", LOGO_32),
        ("logo-64x64.png", LOGO_64),
        ("logo-svg.svg", LOGO_SVG),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(dir)
}

fn env_path(key: &str) -> Option<PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn user_data_dir() -> Result<PathBuf> {
    if let Some(dir) = env_path("JUPYTER_DATA_DIR") {
        return Ok(dir);
    }
    if cfg!(windows) {
        return env_path("APPDATA")
            .map(|d| d.join("jupyter"))
            .context("APPDATA is not set");
    }
    let home = env_path("HOME").context("HOME is not set")?;
    if cfg!(target_os = "macos") {
        return Ok(home.join("Library").join("Jupyter"));
    }
    let data = env_path("XDG_DATA_HOME").unwrap_or_else(|| home.join(".local").join("share"));
    Ok(data.join("jupyter"))
}

fn python_prefix() -> Result<PathBuf> {
    if let Some(prefix) = env_path("VIRTUAL_ENV").or_else(|| env_path("CONDA_PREFIX")) {
        return Ok(prefix);
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.prefix)"])
        .output()
        .context("--sys-prefix: no VIRTUAL_ENV or CONDA_PREFIX, and python3 did not run")?;
    if !out.status.success() {
        bail!("--sys-prefix: python3 could not tell its sys.prefix");
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernelspec_runs_this_binary_with_the_connection_file() {
        let spec = kernel_json(Path::new("/opt/bin/rlvr"));
        assert_eq!(
            spec["argv"],
            json!([
                "/opt/bin/rlvr",
                "kernel",
                "--connection-file",
                "{connection_file}"
            ])
        );
        assert_eq!(spec["display_name"], "Rhai (rlvr)");
        assert_eq!(spec["language"], "rhai");
        assert_eq!(spec["interrupt_mode"], "message");
    }

    #[test]
    fn install_under_a_prefix_writes_the_spec_and_logos() {
        let prefix = std::env::temp_dir().join(format!("rlvr-kernelspec-{}", std::process::id()));
        let dir = install(&Location::Prefix(prefix.clone()), Path::new("/x/rlvr")).unwrap();
        assert_eq!(dir, prefix.join("share/jupyter/kernels/rhai"));
        let spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("kernel.json")).unwrap()).unwrap();
        assert_eq!(spec["argv"][0], "/x/rlvr");
        for logo in ["logo-32x32.png", "logo-64x64.png", "logo-svg.svg"] {
            assert!(dir.join(logo).is_file(), "{logo}");
        }
        std::fs::remove_dir_all(prefix).unwrap();
    }
}
