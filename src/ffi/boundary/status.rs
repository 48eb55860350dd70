//! The status every export returns, the failures that map to it, and the thread-local
//! message of the last failure.

use std::cell::RefCell;
use std::ffi::{c_char, CString};

use crate::error::Error;

/// Result of every call. `QWENCLIP_OK` is 0; anything else has a message in
/// `qwenclip_last_error()`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum qwenclip_status {
    QWENCLIP_OK = 0,
    /// A required pointer argument was NULL.
    QWENCLIP_NULL_ARGUMENT = 1,
    /// A string argument was not valid UTF-8.
    QWENCLIP_INVALID_UTF8 = 2,
    /// A value was out of range or a JSON config was invalid.
    QWENCLIP_INVALID_ARGUMENT = 3,
    /// A caller buffer had the wrong number of elements.
    QWENCLIP_BUFFER_SIZE = 4,
    /// The handle is unknown, freed, or of another kind.
    QWENCLIP_INVALID_HANDLE = 5,
    /// A file was missing, unreadable or malformed.
    QWENCLIP_FILE_ERROR = 6,
    /// An adapter or checkpoint does not fit the base model.
    QWENCLIP_MISMATCH = 7,
    /// Training produced NaN/Inf; nothing was updated.
    QWENCLIP_NON_FINITE = 8,
    /// A bug inside the library was caught at the boundary.
    QWENCLIP_PANIC = 9,
    /// Any other failure (e.g. a device error).
    QWENCLIP_FAILED = 10,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
    static LAST_WARNING: RefCell<CString> = RefCell::new(CString::default());
}

pub struct Failure {
    pub status: qwenclip_status,
    pub msg: String,
}

impl Failure {
    pub fn new(status: qwenclip_status, msg: impl Into<String>) -> Self {
        Self {
            status,
            msg: msg.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        use qwenclip_status::*;
        let status = match &e {
            Error::Io { .. }
            | Error::Json { .. }
            | Error::Format { .. }
            | Error::Shape { .. }
            | Error::MissingTensor { .. }
            | Error::Tokenizer { .. }
            | Error::Hub(_) => QWENCLIP_FILE_ERROR,
            Error::Mismatch(_) => QWENCLIP_MISMATCH,
            Error::Invalid(_) => QWENCLIP_INVALID_ARGUMENT,
            Error::NonFinite(_) => QWENCLIP_NON_FINITE,
            Error::Candle(_) => QWENCLIP_FAILED,
        };
        Self::new(status, e.to_string())
    }
}

impl From<candle_core::Error> for Failure {
    fn from(e: candle_core::Error) -> Self {
        Failure::from(Error::from(e))
    }
}

pub(in crate::ffi) type FfiResult<T> = Result<T, Failure>;

pub(super) fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// What a successful call wants its caller to know (one warning per line).
pub(in crate::ffi) fn set_warning(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_WARNING.with(|w| *w.borrow_mut() = c);
}

pub(in crate::ffi) fn invalid(msg: impl Into<String>) -> Failure {
    Failure::new(qwenclip_status::QWENCLIP_INVALID_ARGUMENT, msg)
}

/// The message of the last failed call on this thread, valid until the next call on it.
pub(in crate::ffi) fn last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The warnings of the last call on this thread, valid until the next call on it.
pub(in crate::ffi) fn last_warning() -> *const c_char {
    LAST_WARNING.with(|w| w.borrow().as_ptr())
}
