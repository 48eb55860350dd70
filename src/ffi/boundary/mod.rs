//! What every export shares: status codes and the last error ([`status`]), the panic
//! boundary ([`guard`]) and argument checks ([`args`]).

mod args;
mod guard;
mod status;

pub(super) use args::{
    buffer, buffer_mut, json_arg, json_out, opt_str_arg, out_ptr, prompts_arg, str_arg,
};
pub(super) use guard::call;
pub(super) use status::{invalid, last_error, last_warning, set_warning, FfiResult};
pub use status::{qwenclip_status, Failure};
