#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = qwenclip_fuzz::configs(data);
});
