//! Process settings applied once, before any work, by every front end: the `rlvr` binary
//! (and the Jupyter kernel it runs), the test binaries and a Rust program or notebook using
//! the library. Call [`init`] first thing; it is idempotent.
//!
//! - **One pool of worker threads**: rayon's, where the matrix products and the fused
//!   elementwise ops run. candle runs its own elementwise ops on a second pool whose threads
//!   spin between ops and take cores from the first (a 256-token prefill ran at 410 tokens/s
//!   with both, 530 with rayon's alone), so unless `CANDLE_NUM_THREADS` is set those ops run
//!   on the calling thread. The count is also made once: unless `RAYON_NUM_THREADS` is set,
//!   candle counts the physical cores anew by reading `/proc/cpuinfo` at every product.
//! - **Freed memory kept for reuse** (where mimalloc is the allocator, as in the binary: see
//!   [`Allocator`]): a training step frees and allocates the same large blocks over and
//!   over, and every block fetched afresh from the system is zeroed page by page first (a
//!   sixth of a LoRA step's time). The peak resident memory is unchanged; memory freed after
//!   the peak stays with the process until it exits.
//! - **Tables print** at most 30 rows, 14 columns and 60 characters a cell.
//!
//! Settings the user made in the environment win over all of these.

use std::sync::OnceLock;

/// The allocator the binary and the tests run with: mimalloc. Loading a dataset allocates
/// and frees hundreds of thousands of small strings, which glibc's allocator handles several
/// times slower. A program using the library opts in with
/// `#[global_allocator] static ALLOCATOR: rlvr::runtime::Allocator = rlvr::runtime::Allocator;`.
pub use mimalloc::MiMalloc as Allocator;

/// What [`init`] settled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Threads of rayon's pool, where the products run.
    pub threads: usize,
    /// Threads of candle's own pool for its elementwise ops (1: the calling thread).
    pub candle_threads: usize,
}

/// The settings once [`init`] has run.
static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// The settings [`init`] applied, or `None` where it has not run in this process.
pub fn applied() -> Option<Settings> {
    SETTINGS.get().copied()
}

/// mimalloc's `mi_option_purge_delay` (its index in `mimalloc.h`'s `mi_option_t`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Applies the settings above once per process and returns them. Call it before any other
/// thread starts (first thing in `main`): it sets environment variables, which rayon and
/// candle read when they start their pools.
pub fn init() -> Settings {
    *SETTINGS.get_or_init(|| {
        // SAFETY: sets one of mimalloc's integer options; any value is valid for it, and it
        // has no effect where mimalloc is not the allocator.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
        default_env("RAYON_NUM_THREADS", || {
            candle_core::utils::get_num_threads().to_string()
        });
        default_env("CANDLE_NUM_THREADS", || "1".to_string());
        default_env("POLARS_FMT_MAX_ROWS", || "30".to_string());
        default_env("POLARS_FMT_STR_LEN", || "60".to_string());
        default_env("POLARS_FMT_MAX_COLS", || "14".to_string());
        let count = |key: &str| {
            std::env::var(key)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1)
        };
        Settings {
            threads: count("RAYON_NUM_THREADS"),
            candle_threads: count("CANDLE_NUM_THREADS"),
        }
    })
}

/// Sets `key` to `value()` unless the environment has it.
fn default_env(key: &str, value: impl FnOnce() -> String) {
    if std::env::var_os(key).is_none() {
        std::env::set_var(key, value());
    }
}
