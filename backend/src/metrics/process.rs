//! The daemon's own figures, from /proc/self: resident memory, threads
//! and uptime.

/// What /proc says about this process now; `None` where it could not be
/// read.
pub struct Sample {
    /// Resident set size.
    pub rss_bytes: Option<u64>,
    /// Threads.
    pub threads: Option<u64>,
    /// Seconds since the process started.
    pub uptime_s: Option<f64>,
}

impl Sample {
    /// Reads /proc/self/statm, /proc/self/stat and /proc/uptime.
    pub fn now() -> Sample {
        let statm = std::fs::read_to_string("/proc/self/statm").ok();
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let uptime = std::fs::read_to_string("/proc/uptime").ok();
        parse(
            statm.as_deref(),
            stat.as_deref(),
            uptime.as_deref(),
            page_size(),
            ticks(),
        )
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the running system.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).unwrap_or(4096)
}

fn ticks() -> u64 {
    // SAFETY: as above.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(n).unwrap_or(100)
}

fn parse(
    statm: Option<&str>,
    stat: Option<&str>,
    uptime: Option<&str>,
    page: u64,
    ticks: u64,
) -> Sample {
    let rss_pages = statm.and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok());
    // The command name may hold spaces and parentheses: fields count
    // from after its last ')', where field 3 (the state) comes first.
    let fields: Vec<&str> = stat
        .and_then(|s| s.rsplit_once(')'))
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let since_boot = uptime.and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok());
    let started = field(22).map(|t| t as f64 / ticks.max(1) as f64);
    Sample {
        rss_bytes: rss_pages.map(|p| p * page),
        threads: field(20),
        uptime_s: since_boot.zip(started).map(|(b, s)| (b - s).max(0.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_name_with_spaces_and_parentheses_does_not_shift_fields() {
        let stat = "42 (a) b) (c) S 1 42 42 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 7 0 1000 \
                    1000000 300 18446744073709551615";
        let s = parse(
            Some("1000 300 20 1 0 50 0"),
            Some(stat),
            Some("15.50 10.00"),
            4096,
            100,
        );
        assert_eq!(s.rss_bytes, Some(300 * 4096));
        assert_eq!(s.threads, Some(7));
        assert_eq!(s.uptime_s, Some(5.5));
    }

    #[test]
    fn what_cannot_be_read_is_left_out() {
        let s = parse(None, Some("garbage"), Some("x"), 4096, 100);
        assert!(s.rss_bytes.is_none() && s.threads.is_none() && s.uptime_s.is_none());
    }
}
