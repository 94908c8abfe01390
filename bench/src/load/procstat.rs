//! Resident memory, CPU time (user and kernel), context switches and time
//! spent waiting for a CPU of a process and its children, from /proc.

use std::time::Duration;

/// Pids of `pid` and all its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    out
}

/// Resident set size of the process tree, bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    tree(pid)
        .into_iter()
        .filter_map(|p| {
            let s = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            let kb: u64 = s
                .lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(kb * 1024)
        })
        .sum()
}

/// CPU time of a process tree, split where it was spent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTime {
    /// In the processes' own code (user time).
    pub user: Duration,
    /// In the kernel on their behalf: system calls, page faults and the
    /// network stack's work done in their context (system time).
    pub kernel: Duration,
}

impl CpuTime {
    /// User and kernel time together.
    pub fn total(self) -> Duration {
        self.user + self.kernel
    }

    /// The time used since `before` (zero where a counter went back).
    pub fn since(self, before: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user.saturating_sub(before.user),
            kernel: self.kernel.saturating_sub(before.kernel),
        }
    }
}

/// User and system CPU time of the process tree so far (each process's
/// threads included, exited ones too).
pub fn cpu_time(pid: u32) -> CpuTime {
    tree(pid)
        .into_iter()
        .filter_map(|p| cpu_in(std::path::Path::new(&format!("/proc/{p}/stat"))))
        .fold(CpuTime::default(), |a, b| CpuTime {
            user: a.user + b.user,
            kernel: a.kernel + b.kernel,
        })
}

/// The user and system time in one `/proc/.../stat` file.
fn cpu_in(path: &std::path::Path) -> Option<CpuTime> {
    let s = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may contain spaces).
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // Linux reports in clock ticks; USER_HZ is 100 on every mainstream
    // architecture.
    Some(CpuTime {
        user: Duration::from_millis(utime * 10),
        kernel: Duration::from_millis(stime * 10),
    })
}

/// Context switches (voluntary and involuntary) of every thread of the
/// process tree so far. Each one is a thread going to sleep or being
/// preempted, and on a virtual machine each wake-up that follows is costly,
/// so switches per request show how much a target's threads hand work to
/// each other or sleep between the steps of one request. Threads that have
/// exited are not counted.
pub fn context_switches(pid: u32) -> u64 {
    thread_files(pid, "status")
        .filter_map(|path| switches_in(&path))
        .sum()
}

/// The file `name` of every thread of the process tree
/// (`/proc/PID/task/TID/NAME`).
fn thread_files(pid: u32, name: &'static str) -> impl Iterator<Item = std::path::PathBuf> {
    tree(pid).into_iter().flat_map(move |p| {
        std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .map(move |e| e.path().join(name))
    })
}

/// Voluntary plus involuntary switches from one `/proc/.../status` file.
fn switches_in(path: &std::path::Path) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    Some(
        s.lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches:")
                    || l.starts_with("nonvoluntary_ctxt_switches:")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>(),
    )
}

/// Time every thread of the process tree has spent runnable but waiting
/// for a CPU so far (the second field of each thread's
/// `/proc/.../schedstat`, kept by the kernel's scheduler statistics). On a
/// machine a target shares with the generator and the upstream, this is
/// the part of its latency that is queueing for a core rather than work:
/// wake-ups not yet run and preemptions in the middle of a request alike.
/// Threads that have exited are not counted; without scheduler statistics
/// in the kernel it stays zero.
pub fn run_queue_wait(pid: u32) -> Duration {
    thread_files(pid, "schedstat")
        .filter_map(|path| wait_in(&path))
        .sum()
}

/// The run-queue wait from one `/proc/.../schedstat` file (nanoseconds on
/// the CPU, nanoseconds waiting, time slices).
fn wait_in(path: &std::path::Path) -> Option<Duration> {
    let s = std::fs::read_to_string(path).ok()?;
    let ns: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// Samples a process tree's RSS every `every` until stopped; keeps the peak.
pub struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<(u64, Vec<u64>)>>,
}

impl RssSampler {
    /// Starts sampling.
    pub fn start(pid: u32, every: Duration) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = 0;
            let mut samples = Vec::new();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let r = rss_bytes(pid);
                peak = peak.max(r);
                samples.push(r);
                std::thread::sleep(every);
            }
            (peak, samples)
        });
        RssSampler {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops; returns the peak and every sample.
    pub fn finish(mut self) -> (u64, Vec<u64>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

/// The machine's CPU time split from the first line of `/proc/stat`:
/// (ticks in all states, ticks stolen by the hypervisor).
pub fn machine_ticks() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    // (guest time is already counted in user).
    let total: u64 = f.iter().take(8).sum();
    Some((total, *f.get(7)?))
}

/// Share of the machine's CPU time the hypervisor took between two
/// readings of [`machine_ticks`], in percent. On a virtual machine this is
/// time no process could run, which shows up as latency in every scenario.
pub fn steal_percent(before: (u64, u64), after: (u64, u64)) -> f64 {
    let total = after.0.saturating_sub(before.0);
    let stolen = after.1.saturating_sub(before.1);
    if total == 0 {
        0.0
    } else {
        stolen as f64 * 100.0 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_switches_count_every_thread_of_the_process() {
        let me = std::process::id();
        assert!(
            context_switches(me) > 0,
            "a running process has switched at least once"
        );
        // A helper thread that sleeps 20 times switches out at least 20
        // times; the process total, read while it is alive, includes its
        // own count and the waiting main thread's. (Other test threads of
        // this process may exit meanwhile, so totals taken at two moments
        // are not compared.)
        let (own, total) = std::thread::spawn(|| {
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let own = switches_in(std::path::Path::new("/proc/thread-self/status"));
            (own, context_switches(std::process::id()))
        })
        .join()
        .expect("helper thread");
        let own = own.expect("the thread's own status is readable");
        assert!(own >= 20, "the helper switched {own} times");
        assert!(total > own, "process total {total}, helper alone {own}");
    }

    #[test]
    fn system_calls_count_as_kernel_time_and_arithmetic_as_user_time() {
        // This thread's own counters (other tests run in this process at
        // the same time). Each phase runs until they have moved by 300 ms
        // (ticks are 10 ms), so the other half moves little in comparison
        // however busy the machine is.
        let own = || cpu_in(std::path::Path::new("/proc/thread-self/stat")).expect("own stat");
        let phase = |work: &mut dyn FnMut()| {
            let before = own();
            let started = std::time::Instant::now();
            while own().total() < before.total() + Duration::from_millis(300) {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "300 ms of CPU did not come within a minute"
                );
                for _ in 0..1000 {
                    work();
                }
            }
            own().since(before)
        };
        let mut x = 0u64;
        let user = phase(&mut || {
            for _ in 0..1000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        });
        // Reading /dev/zero has the kernel clear the whole buffer while
        // the program does nothing with it: nearly all of that time is the
        // kernel's. (A system call that does nothing, such as an empty
        // write, is so cheap on some machines that the loop around it gets
        // as many ticks as the kernel does.)
        let zero = std::fs::File::open("/dev/zero").expect("/dev/zero");
        let mut buf = vec![0u8; 64 * 1024];
        let kernel = phase(&mut || {
            use std::io::Read;
            let _ = (&zero).read(&mut buf);
        });
        assert!(
            user.user > user.kernel * 2,
            "arithmetic: {user:?} (user time should dominate)"
        );
        assert!(
            kernel.kernel > kernel.user,
            "system calls: {kernel:?} (kernel time should dominate)"
        );
        // The process total holds at least this thread's share.
        let total = cpu_time(std::process::id());
        let mine = own();
        assert!(total.user >= mine.user && total.kernel >= mine.kernel);
    }

    #[test]
    fn a_process_that_is_gone_has_no_switches() {
        // Pid numbers above the kernel's maximum never exist.
        assert_eq!(context_switches(u32::MAX), 0);
        assert_eq!(run_queue_wait(u32::MAX), Duration::ZERO);
    }

    #[test]
    fn threads_that_outnumber_the_cores_wait_for_them() {
        // One more busy thread than there are cores: for 200 ms at least
        // one of them is runnable without a core at any moment. The cores
        // are counted from /proc/stat as well, since a CPU quota lowers
        // `available_parallelism` without taking cores away (and time
        // throttled by a quota is not run-queue wait).
        let online = std::fs::read_to_string("/proc/stat")
            .map(|s| {
                s.lines()
                    .filter(|l| {
                        l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)
                    })
                    .count()
            })
            .unwrap_or(0);
        let busy = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .max(online)
            + 1;
        let spun = std::sync::Arc::new(std::sync::Barrier::new(busy + 1));
        let counted = std::sync::Arc::new(std::sync::Barrier::new(busy + 1));
        let threads: Vec<_> = (0..busy)
            .map(|_| {
                let (spun, counted) = (spun.clone(), counted.clone());
                let spawned = std::time::Instant::now();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while spawned.elapsed() < Duration::from_millis(200) {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                    let own = std::path::Path::new("/proc/thread-self/schedstat");
                    let on_cpu = std::fs::read_to_string(own)
                        .ok()
                        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                        .map(Duration::from_nanos);
                    let waited = wait_in(own);
                    let lived = spawned.elapsed();
                    spun.wait();
                    // Stays alive until the process total has been read.
                    counted.wait();
                    (waited, on_cpu, lived)
                })
            })
            .collect();
        spun.wait();
        let total = run_queue_wait(std::process::id());
        counted.wait();
        let mut waited = Duration::ZERO;
        for t in threads {
            let (w, on_cpu, lived) = t.join().expect("busy thread");
            let (w, on_cpu) = (
                w.expect("the thread's own schedstat is readable"),
                on_cpu.expect("the thread's time on a CPU is readable"),
            );
            // A thread is running, waiting for a core or asleep: the
            // first two cannot add up to more than its life (a reading of
            // the wrong field, its time on a CPU, would count that twice).
            assert!(
                w + on_cpu <= lived + Duration::from_millis(5),
                "waited {w:?} and ran {on_cpu:?} in {lived:?}"
            );
            waited += w;
        }
        assert!(
            waited >= Duration::from_millis(10),
            "{busy} busy threads on {} cores waited {waited:?} in all",
            busy - 1
        );
        assert!(
            total >= waited,
            "process total {total:?}, busy threads {waited:?}"
        );
    }
}
