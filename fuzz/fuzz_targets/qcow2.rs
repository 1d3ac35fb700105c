//! Fuzzes the qcow2 header and metadata parsers: any bytes, opened as an
//! image and read through, must give errors, never a panic or a hang.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_formats::qcow2::fuzz::open_and_read(data);
});
