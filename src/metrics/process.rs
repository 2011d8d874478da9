//! The process's own resources, read from `/proc` at scrape time (Linux only; other
//! systems report nothing rather than zeros).

/// The standard `process_*` values (names as in Prometheus's client libraries).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    pub resident_memory_bytes: u64,
    pub virtual_memory_bytes: u64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
    pub cpu_seconds: f64,
    /// Unix time the process started.
    pub start_time_seconds: f64,
}

/// Reads them now; `None` when `/proc` is not there.
pub fn read() -> Option<ProcessStats> {
    use procfs::process::{LimitValue, Process};
    let me = Process::myself().ok()?;
    let stat = me.stat().ok()?;
    let ticks = procfs::ticks_per_second() as f64;
    let boot = procfs::boot_time_secs().ok()? as f64;
    let max_fds = me
        .limits()
        .ok()
        .and_then(|l| match l.max_open_files.soft_limit {
            LimitValue::Value(v) => Some(v),
            LimitValue::Unlimited => None,
        });
    Some(ProcessStats {
        resident_memory_bytes: stat.rss * procfs::page_size(),
        virtual_memory_bytes: stat.vsize,
        open_fds: me.fd_count().ok()? as u64,
        max_fds,
        cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
        start_time_seconds: boot + stat.starttime as f64 / ticks,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn reads_this_process() {
        let s = super::read().expect("/proc is mounted");
        assert!(s.resident_memory_bytes > 1 << 20);
        assert!(s.virtual_memory_bytes >= s.resident_memory_bytes);
        assert!(s.open_fds >= 3);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(s.start_time_seconds <= now + 1.0 && s.start_time_seconds > now - 86_400.0 * 365.0);
    }
}
