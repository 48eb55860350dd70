//! Checks of what a C caller passes: pointers, strings and buffers become references or a
//! [`Failure`] that names the argument.

use std::ffi::{c_char, CStr};

use super::qwenclip_status;
use super::status::{invalid, Failure, FfiResult};

fn null(name: &str) -> Failure {
    Failure::new(
        qwenclip_status::QWENCLIP_NULL_ARGUMENT,
        format!("`{name}` is NULL"),
    )
}

/// A NUL-terminated UTF-8 argument.
pub(in crate::ffi) fn str_arg<'a>(p: *const c_char, name: &str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err(null(name));
    }
    // Safety: the caller promises a NUL-terminated string that lives for the call.
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|e| {
        Failure::new(
            qwenclip_status::QWENCLIP_INVALID_UTF8,
            format!("`{name}` is not valid UTF-8 ({e})"),
        )
    })
}

/// A JSON argument read into `T`; a syntax error quotes the text around it, since hosts
/// build the JSON and "line 1 column 652" alone says little.
pub(in crate::ffi) fn json_arg<T: for<'de> serde::Deserialize<'de>>(
    text: &str,
    what: &str,
) -> FfiResult<T> {
    serde_json::from_str(text).map_err(|e| invalid(format!("{what} JSON: {e}{}", near(text, &e))))
}

fn near(text: &str, e: &serde_json::Error) -> String {
    let Some(line) = text.lines().nth(e.line().saturating_sub(1)) else {
        return String::new();
    };
    let at = e.column().saturating_sub(1).min(line.len());
    let window = &line.as_bytes()[at.saturating_sub(24)..(at + 24).min(line.len())];
    if window.is_empty() {
        return String::new();
    }
    format!(" (near `{}`)", String::from_utf8_lossy(window))
}

/// An optional string argument: NULL is `None`.
pub(in crate::ffi) fn opt_str_arg<'a>(p: *const c_char, name: &str) -> FfiResult<Option<&'a str>> {
    if p.is_null() {
        Ok(None)
    } else {
        str_arg(p, name).map(Some)
    }
}

/// `n` prompts from an array of NUL-terminated UTF-8 strings.
pub(in crate::ffi) fn prompts_arg<'a>(
    p: *const *const c_char,
    n: usize,
) -> FfiResult<Vec<&'a str>> {
    if n == 0 {
        return Err(Failure::new(
            qwenclip_status::QWENCLIP_INVALID_ARGUMENT,
            "no prompts (count is 0)",
        ));
    }
    if p.is_null() {
        return Err(null("prompts"));
    }
    // Safety: the caller promises `n` readable pointers.
    let ptrs = unsafe { std::slice::from_raw_parts(p, n) };
    ptrs.iter()
        .enumerate()
        .map(|(i, &s)| str_arg(s, &format!("prompts[{i}]")))
        .collect()
}

/// A caller-owned output location.
pub(in crate::ffi) fn out_ptr<'a, T>(p: *mut T, name: &str) -> FfiResult<&'a mut T> {
    // Safety: non-null checked; the caller promises it points to a writable T.
    unsafe { p.as_mut() }.ok_or_else(|| null(name))
}

/// A caller-owned f32 buffer that must hold exactly `expected` elements.
pub(in crate::ffi) fn buffer_mut<'a>(
    p: *mut f32,
    len: usize,
    expected: usize,
    name: &str,
) -> FfiResult<&'a mut [f32]> {
    check_buffer(p.is_null(), len, expected, name)?;
    // Safety: the caller promises `len` writable floats.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// A caller-owned read-only f32 buffer of exactly `expected` elements.
pub(in crate::ffi) fn buffer<'a>(
    p: *const f32,
    len: usize,
    expected: usize,
    name: &str,
) -> FfiResult<&'a [f32]> {
    check_buffer(p.is_null(), len, expected, name)?;
    // Safety: the caller promises `len` readable floats.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

fn check_buffer(is_null: bool, len: usize, expected: usize, name: &str) -> FfiResult<()> {
    if is_null {
        return Err(null(name));
    }
    if len != expected {
        return Err(Failure::new(
            qwenclip_status::QWENCLIP_BUFFER_SIZE,
            format!("`{name}` holds {len} floats, {expected} are needed"),
        ));
    }
    Ok(())
}

/// A JSON document written into a caller buffer: `needed` gets its size with the NUL; a NULL
/// `buf` only asks for the size; a buffer that is too small is `QWENCLIP_BUFFER_SIZE`.
pub(in crate::ffi) fn json_out(
    value: &serde_json::Value,
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> FfiResult<()> {
    let text = value.to_string();
    *out_ptr(needed, "needed")? = text.len() + 1;
    if buf.is_null() {
        return Ok(());
    }
    if len < text.len() + 1 {
        return Err(Failure::new(
            qwenclip_status::QWENCLIP_BUFFER_SIZE,
            format!("`buf` holds {len} bytes, {} are needed", text.len() + 1),
        ));
    }
    // Safety: the caller promises `len` writable bytes at `buf`; checked above.
    let out = unsafe { std::slice::from_raw_parts_mut(buf as *mut u8, len) };
    out[..text.len()].copy_from_slice(text.as_bytes());
    out[text.len()] = 0;
    Ok(())
}
