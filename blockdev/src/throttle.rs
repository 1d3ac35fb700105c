//! Throttle groups' limits, as `--object throttle-group` and `object-add`
//! spell them.

use strata_formats::throttle::group::{Limit, Limits};

use crate::options::{Options, OptionsError};

const KINDS: [&str; 3] = ["total", "read", "write"];
/// QEMU's ceiling on any limit.
const LIMIT_MAX: u64 = 1_000_000_000_000_000;

/// Parses a throttle group's `limits.*` (or QEMU's legacy `x-*`) options
/// and checks them as QEMU does.
pub fn throttle_limits(o: &mut Options) -> Result<Limits, OptionsError> {
    let mut group = o.take_group("limits")?;
    let mut lim = Limits::default();
    for (unit, slot) in [("bps", 0usize), ("iops", 1)] {
        for (k, kind) in KINDS.iter().enumerate() {
            let base = format!("{unit}-{kind}");
            let mut get = |suffix: &str| -> Result<Option<u64>, OptionsError> {
                let key = format!("{base}{suffix}");
                let legacy = o.take_u64(&format!("x-{key}"))?;
                let modern = match group.as_mut() {
                    Some(g) => g.take_u64(&key)?,
                    None => None,
                };
                let v = modern.or(legacy);
                if v.is_some_and(|v| v > LIMIT_MAX) {
                    return Err(OptionsError::Value {
                        param: key,
                        expected: format!("a value no larger than {LIMIT_MAX}"),
                    });
                }
                Ok(v)
            };
            let avg = get("")?.unwrap_or(0);
            let max = get("-max")?.unwrap_or(0);
            let len = get("-max-length")?;
            if max > 0 && max < avg {
                return Err(OptionsError::Value {
                    param: format!("{base}-max"),
                    expected: format!("a value at least {base} ({avg})"),
                });
            }
            if len.is_some() && max == 0 {
                return Err(OptionsError::Value {
                    param: format!("{base}-max-length"),
                    expected: format!("{base}-max to be set too"),
                });
            }
            if len == Some(0) {
                return Err(OptionsError::Value {
                    param: format!("{base}-max-length"),
                    expected: "a value of at least 1".into(),
                });
            }
            let l = Limit {
                avg: avg as f64,
                max: max as f64,
                max_length: len.unwrap_or(1) as f64,
            };
            if slot == 0 {
                lim.bps[k] = l;
            } else {
                lim.iops[k] = l;
            }
        }
    }
    lim.iops_size = match group.as_mut() {
        Some(g) => g.take_u64("iops-size")?,
        None => None,
    }
    .or(o.take_u64("x-iops-size")?)
    .unwrap_or(0);
    for (unit, ls) in [("bps", &lim.bps), ("iops", &lim.iops)] {
        if ls[0].avg > 0.0 && (ls[1].avg > 0.0 || ls[2].avg > 0.0) {
            return Err(OptionsError::Value {
                param: format!("{unit}-total"),
                expected: format!("not to be combined with {unit}-read or {unit}-write"),
            });
        }
    }
    if let Some(g) = group {
        g.finish()?;
    }
    Ok(lim)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn limits(v: serde_json::Value) -> Result<Limits, OptionsError> {
        throttle_limits(&mut Options::from_json(v).unwrap())
    }

    #[test]
    fn limits_parse_and_are_checked_as_qemu_does() {
        let l = limits(json!({"limits": {"iops-total": 100, "iops-total-max": 200, "iops-total-max-length": 2, "bps-read": 1048576}})).unwrap();
        assert_eq!(
            l.iops[0],
            Limit {
                avg: 100.0,
                max: 200.0,
                max_length: 2.0
            }
        );
        assert_eq!(l.bps[1].avg, 1048576.0);
        let legacy = limits(json!({"x-iops-total": 5})).unwrap();
        assert_eq!(legacy.iops[0].avg, 5.0);
        assert_eq!(
            limits(json!({"limits": {"iops-total": 100, "iops-total-max": 50}}))
                .unwrap_err()
                .to_string(),
            "Parameter 'iops-total-max' expects a value at least iops-total (100)"
        );
        assert!(limits(json!({"limits": {"bps-total": 1, "bps-read": 1}})).is_err());
        assert!(limits(json!({"limits": {"iops-total-max-length": 3}})).is_err());
        assert_eq!(
            limits(json!({"limits": {"iops": 1}}))
                .unwrap_err()
                .to_string(),
            "Parameter 'limits.iops' is unexpected"
        );
    }
}
