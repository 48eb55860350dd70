//! What every export shares: status codes, the thread-local last error, the panic boundary
//! and argument checks.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

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

/// Version of this C interface; bumped on any incompatible change.
pub const QWENCLIP_ABI_VERSION: u32 = 2;
/// `qwenclip_capabilities()` bit: the CPU path (always set).
pub const QWENCLIP_CAP_CPU: u32 = 1;
/// `qwenclip_capabilities()` bit: built with CUDA.
pub const QWENCLIP_CAP_CUDA: u32 = 2;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
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

pub(super) type FfiResult<T> = Result<T, Failure>;

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs an export's body: clears the last error, catches panics, maps failures to codes.
pub(super) fn call(f: impl FnOnce() -> FfiResult<()>) -> qwenclip_status {
    set_error("");
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

/// A NUL-terminated UTF-8 argument.
pub(super) fn str_arg<'a>(p: *const c_char, name: &str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err(Failure::new(
            qwenclip_status::QWENCLIP_NULL_ARGUMENT,
            format!("`{name}` is NULL"),
        ));
    }
    // Safety: the caller promises a NUL-terminated string that lives for the call.
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|e| {
        Failure::new(
            qwenclip_status::QWENCLIP_INVALID_UTF8,
            format!("`{name}` is not valid UTF-8 ({e})"),
        )
    })
}

/// An optional string argument: NULL is `None`.
pub(super) fn opt_str_arg<'a>(p: *const c_char, name: &str) -> FfiResult<Option<&'a str>> {
    if p.is_null() {
        Ok(None)
    } else {
        str_arg(p, name).map(Some)
    }
}

/// `n` prompts from an array of NUL-terminated UTF-8 strings.
pub(super) fn prompts_arg<'a>(p: *const *const c_char, n: usize) -> FfiResult<Vec<&'a str>> {
    if n == 0 {
        return Err(Failure::new(
            qwenclip_status::QWENCLIP_INVALID_ARGUMENT,
            "no prompts (count is 0)",
        ));
    }
    if p.is_null() {
        return Err(Failure::new(
            qwenclip_status::QWENCLIP_NULL_ARGUMENT,
            "`prompts` is NULL",
        ));
    }
    // Safety: the caller promises `n` readable pointers.
    let ptrs = unsafe { std::slice::from_raw_parts(p, n) };
    ptrs.iter()
        .enumerate()
        .map(|(i, &s)| str_arg(s, &format!("prompts[{i}]")))
        .collect()
}

/// A caller-owned output location.
pub(super) fn out_ptr<'a, T>(p: *mut T, name: &str) -> FfiResult<&'a mut T> {
    // Safety: non-null checked; the caller promises it points to a writable T.
    unsafe { p.as_mut() }.ok_or_else(|| {
        Failure::new(
            qwenclip_status::QWENCLIP_NULL_ARGUMENT,
            format!("`{name}` is NULL"),
        )
    })
}

/// A caller-owned f32 buffer that must hold exactly `expected` elements.
pub(super) fn buffer_mut<'a>(
    p: *mut f32,
    len: usize,
    expected: usize,
    name: &str,
) -> FfiResult<&'a mut [f32]> {
    if p.is_null() {
        return Err(Failure::new(
            qwenclip_status::QWENCLIP_NULL_ARGUMENT,
            format!("`{name}` is NULL"),
        ));
    }
    if len != expected {
        return Err(Failure::new(
            qwenclip_status::QWENCLIP_BUFFER_SIZE,
            format!("`{name}` holds {len} floats, {expected} are needed"),
        ));
    }
    // Safety: the caller promises `len` writable floats.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// A caller-owned read-only f32 buffer of exactly `expected` elements.
pub(super) fn buffer<'a>(
    p: *const f32,
    len: usize,
    expected: usize,
    name: &str,
) -> FfiResult<&'a [f32]> {
    if p.is_null() {
        return Err(Failure::new(
            qwenclip_status::QWENCLIP_NULL_ARGUMENT,
            format!("`{name}` is NULL"),
        ));
    }
    if len != expected {
        return Err(Failure::new(
            qwenclip_status::QWENCLIP_BUFFER_SIZE,
            format!("`{name}` holds {len} floats, {expected} are needed"),
        ));
    }
    // Safety: the caller promises `len` readable floats.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

pub(super) fn invalid(msg: impl Into<String>) -> Failure {
    Failure::new(qwenclip_status::QWENCLIP_INVALID_ARGUMENT, msg)
}

/// The message of the last failed call on this thread ("" after a success). The pointer
/// stays valid until the next qwenclip call on the same thread; copy it to keep it.
#[no_mangle]
pub extern "C" fn qwenclip_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The library version as a static NUL-terminated string (never freed).
#[no_mangle]
pub extern "C" fn qwenclip_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The C interface version (`QWENCLIP_ABI_VERSION`); a host should refuse a library whose major
/// interface differs from the header it was built with.
#[no_mangle]
pub extern "C" fn qwenclip_abi_version() -> u32 {
    QWENCLIP_ABI_VERSION
}

/// Compiled features: `QWENCLIP_CAP_CPU` | `QWENCLIP_CAP_CUDA`.
#[no_mangle]
pub extern "C" fn qwenclip_capabilities() -> u32 {
    QWENCLIP_CAP_CPU
        | if cfg!(feature = "cuda") {
            QWENCLIP_CAP_CUDA
        } else {
            0
        }
}
