//! The build without the `http` feature: what would download fails with
//! [`ModelsError::NoHttp`], naming what was asked for.

use std::path::PathBuf;

use super::{Alias, Hub, ModelsError, Result, Store};
use crate::progress::Job;

/// Fetching an alias that is not in the store.
pub(super) fn into_store(_: &Store, alias: &Alias, _: &Job) -> Result<PathBuf> {
    Err(ModelsError::NoHttp(format!("fetching `{}`", alias.name)))
}

/// A hub id, in the cache or not.
pub(super) fn download(repo_id: &str, _: &Hub, _: &Job) -> Result<PathBuf> {
    Err(ModelsError::NoHttp(format!("the hub model `{repo_id}`")))
}
