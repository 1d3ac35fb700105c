//! Fuzzes the NBD server's negotiation and request checks: any bytes a
//! client sends get refusals or a closed connection, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_backend::fuzzing::nbd_client_bytes(data);
});
