//! Fuzzes the guest path: descriptor tables, avail rings and buffers built
//! from the input in guest memory of two or three regions (rings may
//! straddle them), run through intake and dispatch on a null-co node.
//! Nothing may panic, no byte outside the chains' writable buffers and the
//! used ring may change, and no head may complete more often than it was
//! offered.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_backend::fuzzing::guest_path(data);
});
