//! The panic boundary every export's body runs in.

use std::panic::{catch_unwind, AssertUnwindSafe};

use super::qwenclip_status;
use super::status::{set_error, set_warning, FfiResult};

/// Runs an export's body: clears the last error and warning, catches panics, maps failures
/// to codes.
pub(in crate::ffi) fn call(f: impl FnOnce() -> FfiResult<()>) -> qwenclip_status {
    set_error("");
    set_warning("");
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => qwenclip_status::QWENCLIP_OK,
        Ok(Err(failure)) => {
            set_error(&failure.msg);
            failure.status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            set_error(&format!(
                "internal error in qwenclip (please report): {what}"
            ));
            qwenclip_status::QWENCLIP_PANIC
        }
    }
}
