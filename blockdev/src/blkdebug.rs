//! blkdebug's `inject-error` rules, as QEMU spells them.

use strata_formats::blkdebug::Rule;
use strata_graph::IoOp;

use crate::options::{Options, OptionsError};

/// Parses one element of blkdebug's `inject-error`.
pub(crate) fn inject_error_rule(mut o: Options) -> Result<Rule, OptionsError> {
    let event = o.take_str("event")?;
    let event = o.required("event", event)?;
    let iotype = o.take_enum(
        "iotype",
        &[
            "read",
            "write",
            "write-zeroes",
            "discard",
            "flush",
            "block-status",
        ],
    )?;
    let op = match (iotype.as_deref(), event.as_str()) {
        (Some("read"), _) | (None, "read_aio") => IoOp::Read,
        (Some("write"), _) | (None, "write_aio") => IoOp::Write,
        (Some("write-zeroes"), _) => IoOp::WriteZeroes,
        (Some("discard"), _) => IoOp::Discard,
        (Some("flush"), _) | (None, "flush_to_disk") => IoOp::Flush,
        _ => {
            return Err(OptionsError::Value {
                param: o.param("event"),
                expected: "read_aio, write_aio or flush_to_disk, or an 'iotype' \
                           (other blkdebug events are not modelled)"
                    .into(),
            })
        }
    };
    if o.take_i64("state")?.is_some_and(|s| s != 1) {
        return Err(OptionsError::Value {
            param: o.param("state"),
            expected: "1 (blkdebug states are not modelled)".into(),
        });
    }
    let errno = o.take_i64("errno")?.unwrap_or(libc::EIO as i64);
    if !(1..=4095).contains(&errno) {
        return Err(OptionsError::Value {
            param: o.param("errno"),
            expected: "an errno between 1 and 4095".into(),
        });
    }
    let sector = o.take_i64("sector")?.unwrap_or(-1);
    let once = o.take_bool("once")?.unwrap_or(false);
    o.take_bool("immediately")?;
    o.finish()?;
    Ok(Rule::new(
        op,
        errno as i32,
        u64::try_from(sector).ok(),
        once,
    ))
}
