//! Fuzzes the vhost-user control plane: sequences of messages (memory
//! tables, vring num/addr/base/kick, features, config), some with lying
//! sizes, sent to a device serving a null-co node. The daemon must neither
//! panic nor hang, and must tear each connection down.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_backend::fuzzing::vhost_user_messages(data);
});
